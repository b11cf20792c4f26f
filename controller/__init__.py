"""Cluster metadata state machine, placement, failure handling and group coordination."""
