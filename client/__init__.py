"""The Python client: Producer, Consumer and Admin (async first, with sync facades)."""
