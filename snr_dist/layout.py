"""How each piece of optimizer state is laid out across data-parallel ranks.

Estimators declare, for every state tensor they allocate, one `Kind`; distributors read it to
build the world-size-independent checkpoint view (`snr_dist.distributors`). The maths never
needs to know which parallelism runs it, and a distributor never needs to know what a state
tensor means.
"""

from __future__ import annotations

from enum import Enum


class Kind(Enum):
    """The layout of one state tensor of one parameter."""

    PARAM = "param"
    """Shaped like the parameter: under FSDP2 each rank holds the rows of its shard."""
    COLUMNS = "columns"
    """``r x rows`` (a tracker's projected mean): under FSDP2 each rank holds its rows' columns."""
    PARTIAL = "partial"
    """A sum over the rows of the parameter: under FSDP2 each rank holds its rows' part."""
    SHARED = "shared"
    """Identical on every rank (bases, step counts, statistics after their all-reduce)."""
