"""The node-level deterministic simulation (issue 8): the node's own code on simulated seams."""
