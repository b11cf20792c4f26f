"""What the log cleaner reports about one partition log (the metrics read it at scrape time).

Kept apart from cleaner.py so the partition log can hold one without importing the cleaner.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class CleanerStats:
    #: Cleaning runs that finished on this log (any run that rewrote or checked segments).
    runs: int = 0
    #: Bytes the cleaner removed from this log, in total.
    bytes_reclaimed: int = 0
    #: Bytes the cleaner read and wrote for this log, in total (the I/O rate is its rate).
    io_bytes: int = 0
    #: Share of the cleanable log not cleaned yet, as of the last look (0..1).
    dirty_ratio: float = 0.0
    #: Age (ms) of the oldest record of the closed segments not cleaned yet, as of the last
    #: look: an upper bound of how long a superseded record has stayed (0: none).
    compaction_lag_ms: int = 0
    #: Age (ms) of the oldest tombstone the last run kept (0: none kept).
    tombstone_age_ms: int = 0
    #: Timestamp of the oldest tombstone the last run kept (None: none, or not known yet).
    oldest_tombstone_ts: int | None = None
    #: Whether a run has read the cleaned part since the log was opened (until then its
    #: tombstones are not known, and the first look cleans it whatever the dirty ratio).
    tombstones_known: bool = False
