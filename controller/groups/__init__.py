"""Consumer groups: the pure state machine of a group coordinator and its assignors (issue 13).

No I/O here: ``state.GroupCoordinator`` turns heartbeats, commits, timeouts and metadata
changes into records of ``__consumer_offsets`` (``records``) and answers; ``assignors`` holds
the pluggable server-side assignors. The node runs it (tidelog/node/group_coordinator.py).
"""
