"""poolscope: scoped, automatic, alias-free pooling of large PyTorch tensor allocations.

Example::

    import poolscope

    with poolscope.pool_scope():
        out = model(x)

Importing poolscope creates no pool, initialises no device and patches nothing.
"""

from ._decorator import pooled_forward, unpool
from ._errors import EscapeError, PoolscopeError, PoolscopeWarning
from ._pool import TensorPool, get_pool
from ._report import report, reset_report
from ._scope import PoolScope, pool_scope
from ._seed import GlobalMemoryPool, get_global_memory_pool
from ._snapshot import dump_snapshot, snapshot
from ._stats import PoolStats, ScopeStats

__version__ = "0.1.0"

__all__ = [
    "EscapeError",
    "GlobalMemoryPool",
    "PoolScope",
    "PoolStats",
    "PoolscopeError",
    "PoolscopeWarning",
    "ScopeStats",
    "TensorPool",
    "__version__",
    "dump_snapshot",
    "get_global_memory_pool",
    "get_pool",
    "pool_scope",
    "pooled_forward",
    "report",
    "reset_report",
    "snapshot",
    "unpool",
]
