"""Bad input gets a PoolscopeTypeError/PoolscopeValueError (also TypeError/ValueError) naming the value."""

from __future__ import annotations

import pytest
import torch

import poolscope


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"threshold": -1}, ValueError, r"threshold must be >= 0 bytes; got -1"),
        ({"threshold": "1 furlong"}, ValueError, r"threshold must be .*'1MiB'.*got '1 furlong'"),
        ({"threshold": "MiB"}, ValueError, r"got 'MiB'"),
        ({"threshold": 1.5}, TypeError, r"threshold must be .* got 1.5 of type float"),
        ({"threshold": float("nan")}, TypeError, r"got nan of type float"),
        ({"threshold": True}, TypeError, r"got True of type bool"),
        ({"threshold": None}, TypeError, r"got None of type NoneType"),
        ({"capture": "everything"}, ValueError, r"capture must be one of \('all', 'factories'\); got 'everything'"),
        ({"max_bytes": -1}, ValueError, r"max_bytes must be >= 0 bytes; got -1"),
        ({"on_limit": "ignore"}, ValueError, r"on_limit must be one of \('raise', 'fallback'\); got 'ignore'"),
        ({"capture": 3}, TypeError, r"capture must be one of"),
        ({"device": "tpu9"}, ValueError, r"device 'tpu9' is not a device"),
        ({"device": "meta"}, ValueError, r"device 'meta' has no memory to pool"),
        ({"device": 1.0}, TypeError, r"device must be a str, torch.device or int"),
        ({"pool": "cpu"}, TypeError, r"pool must be a poolscope.TensorPool or None; got 'cpu'"),
        ({"strict": 1}, TypeError, r"strict must be True or False; got 1"),
        ({"name": 5}, TypeError, r"name must be a str or None; got 5"),
    ],
)
def test_pool_scope_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match) as raised:
        poolscope.pool_scope(**kwargs)
    assert isinstance(raised.value, poolscope.PoolscopeError)
    with pytest.raises(error, match=match):
        poolscope.pooled_forward(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_a_device_this_machine_lacks_is_not_an_error():
    # Portable code names the device it runs on elsewhere; such a scope passes through
    # (tests/test_boundary.py checks what it routes). Misspelt devices are errors (above).
    assert poolscope.pool_scope("cuda").device == torch.device("cuda", 0)
    assert poolscope.get_pool("cuda:0").engine == "passthrough"


def test_capture_factories_is_deprecated_and_means_all():
    with pytest.warns(DeprecationWarning, match=r"capture='factories'\) is deprecated"):
        scope = poolscope.pool_scope(capture="factories")
    assert scope.threshold == poolscope.pool_scope(capture="all").threshold


def test_ambiguous_lowercase_units_are_refused_with_both_readings():
    with pytest.raises(ValueError, match=r"got '4mb' \(write 4MB for powers of 1000 or 4MiB for powers of 1024\)"):
        poolscope.pool_scope(threshold="4mb")


def test_threshold_units():
    assert poolscope.pool_scope(threshold="1MiB").threshold == 1 << 20
    assert poolscope.pool_scope(threshold="512KB").threshold == 512_000
    assert poolscope.pool_scope(threshold="512KiB").threshold == 512 * 1024
    assert poolscope.pool_scope(threshold="2GB").threshold == 2 * 10**9
    assert poolscope.pool_scope(threshold="1.5 MiB").threshold == 3 << 19
    assert poolscope.pool_scope(threshold="4kB").threshold == 4000
    assert poolscope.pool_scope(threshold="100").threshold == 100
    assert poolscope.pool_scope(threshold=0).threshold == 0


def test_pool_and_device_must_agree():
    pool = poolscope.TensorPool("cpu")
    assert poolscope.pool_scope("cpu", pool=pool).device == torch.device("cpu")


def test_max_cached_bytes_is_validated():
    pool = poolscope.TensorPool("cpu")
    with pytest.raises(ValueError, match=r"max_cached_bytes must be >= 0 bytes; got -5"):
        pool.max_cached_bytes = -5
    with pytest.raises(TypeError, match=r"max_cached_bytes must be .* got 2.5"):
        pool.max_cached_bytes = 2.5
    with pytest.raises(TypeError, match=r"max_cached_bytes"):
        poolscope.TensorPool("cpu", max_cached_bytes=[1])
    pool.max_cached_bytes = "1GiB"
    assert pool.max_cached_bytes == 1 << 30
    pool.max_cached_bytes = None
    assert pool.max_cached_bytes is None


def test_get_pool_is_one_per_device():
    assert poolscope.get_pool() is poolscope.get_pool("cpu") is poolscope.get_pool(torch.device("cpu"))
    with pytest.raises(TypeError, match=r"device must be a str"):
        poolscope.get_pool(None)


def test_active_scope_cannot_be_entered_twice():
    scope = poolscope.pool_scope()
    with scope:
        with pytest.raises(poolscope.PoolscopeError, match=r"already active"):
            with scope:
                pass
    with scope:  # sequential reuse is fine
        pass


def test_exception_inside_scope_propagates_and_cleans_up():
    with pytest.raises(KeyError):
        with poolscope.pool_scope():
            raise KeyError("boom")
    # the autouse fixture checks that no mode and no scope remain


def test_one_exception_base_class():
    assert issubclass(poolscope.PoolscopeError, RuntimeError)
    for cls in (poolscope.EscapeError, poolscope.ScopeLimitError, poolscope.PoolscopeTypeError, poolscope.PoolscopeValueError):
        assert issubclass(cls, poolscope.PoolscopeError)
    assert issubclass(poolscope.PoolscopeTypeError, TypeError)
    assert issubclass(poolscope.PoolscopeValueError, ValueError)
    assert issubclass(poolscope.ScopeLimitError, torch.OutOfMemoryError)
