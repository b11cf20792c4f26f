"""The partition log: segment files with sparse offset and time indexes."""
