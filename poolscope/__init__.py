"""poolscope: scoped, automatic, alias-free pooling of large PyTorch tensor allocations.

Example::

    import poolscope

    with poolscope.pool_scope():
        out = model(x)

Importing poolscope creates no pool, builds nothing, installs no allocator and
initialises no device: the first scope does.
"""

from ._compare import Comparison, compare
from ._decorator import pooled_forward, unpool
from ._errors import (
    EscapeError,
    PoolscopeError,
    PoolscopeTypeError,
    PoolscopeValueError,
    PoolscopeWarning,
    ScopeLimitError,
)
from ._pool import TensorPool, get_pool, release_unused
from ._report import report, reset_report
from ._scope import PoolScope, pool_scope
from ._handwritten import GlobalMemoryPool, get_global_memory_pool
from ._snapshot import dump_snapshot, snapshot
from ._stats import PoolStats, ScopeStats
from .engines import engine

__version__ = "0.2.1"

__all__ = [
    "Comparison",
    "EscapeError",
    "GlobalMemoryPool",
    "PoolScope",
    "PoolStats",
    "PoolscopeError",
    "PoolscopeTypeError",
    "PoolscopeValueError",
    "PoolscopeWarning",
    "ScopeLimitError",
    "ScopeStats",
    "TensorPool",
    "__version__",
    "compare",
    "dump_snapshot",
    "engine",
    "get_global_memory_pool",
    "get_pool",
    "pool_scope",
    "pooled_forward",
    "release_unused",
    "report",
    "reset_report",
    "snapshot",
    "unpool",
]
