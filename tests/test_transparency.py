"""Every captured factory gives the same bits inside a scope as outside, RNG streams included."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import poolscope
from helpers import assert_same

N = 1 << 12  # elements; tests route with a small threshold to stay fast
SMALL = 64 * 4  # bytes


def _inputs():
    base = torch.randn(16, 8, 8, 8)
    return {
        "contig": torch.randn(64, 64),
        "transposed": torch.randn(64, 64).t(),
        "channels_last": base.to(memory_format=torch.channels_last),
        "sliced": torch.randn(64, 128)[:, ::2],
        "odd_stride_size1": torch.empty_strided((64, 1, 64), (64, 7, 1)).normal_(),
        "int": torch.randint(0, 9, (64, 64), dtype=torch.int32),
        "half": torch.randn(64, 64).half(),
    }


def _factory_calls(x: torch.Tensor, g: torch.Generator):
    return {
        "empty_zeroed": lambda: torch.empty(N).zero_(),
        "empty_strided": lambda: torch.empty_strided((64, 64), (1, 64)).fill_(3),
        "empty_cl": lambda: torch.empty(8, 8, 8, 8, memory_format=torch.channels_last).fill_(1),
        "zeros": lambda: torch.zeros(N),
        "zeros_int": lambda: torch.zeros(N, dtype=torch.int16),
        "zeros_bool": lambda: torch.zeros(N, dtype=torch.bool),
        "ones": lambda: torch.ones(64, 64, dtype=torch.float64),
        "ones_int8": lambda: torch.ones(N, dtype=torch.int8),
        "full": lambda: torch.full((N,), 2.5),
        "full_int": lambda: torch.full((N,), 7),
        "full_bool": lambda: torch.full((N,), True),
        "full_complex": lambda: torch.full((N,), 1 + 2j),
        "rand": lambda: torch.rand(N),
        "rand_gen": lambda: torch.rand(N, generator=g),
        "randn": lambda: torch.randn(N, dtype=torch.float64),
        "randn_gen": lambda: torch.randn(N, generator=g),
        "randn_bf16": lambda: torch.randn(N, dtype=torch.bfloat16),
        "randint": lambda: torch.randint(100, (N,)),
        "randint_low_gen": lambda: torch.randint(-5, 5, (N,), generator=g, dtype=torch.int32),
        "empty_like": lambda: torch.empty_like(x).zero_(),
        "zeros_like": lambda: torch.zeros_like(x),
        "ones_like": lambda: torch.ones_like(x),
        "full_like": lambda: torch.full_like(x, 4),
        "rand_like": lambda: torch.rand_like(x, dtype=torch.float32),
        "randn_like": lambda: torch.randn_like(x, dtype=torch.float64),
        "randn_like_gen": lambda: torch.randn_like(x, dtype=torch.float32, generator=g),
        "randint_like": lambda: torch.randint_like(x, 10),
        "randint_like_low": lambda: torch.randint_like(x, 3, 10, generator=g),
        "zeros_like_contig": lambda: torch.zeros_like(x, memory_format=torch.contiguous_format),
        "new_empty": lambda: x.new_empty(N).fill_(0),
        "new_empty_strided": lambda: x.new_empty_strided((64, 64), (1, 64)).fill_(0),
        "new_zeros": lambda: x.new_zeros(64, 64),
        "new_ones": lambda: x.new_ones(N, dtype=torch.float32),
        "new_full": lambda: x.new_full((N,), 2),
        "arange": lambda: torch.arange(N),
        "arange_float": lambda: torch.arange(0, N / 4, 0.25),
        "arange_step": lambda: torch.arange(3, 3 * N, 3, dtype=torch.float64),
        "eye": lambda: torch.eye(64),
        "eye_m": lambda: torch.eye(64, 48, dtype=torch.int64),
        "linspace": lambda: torch.linspace(-1, 1, N),
        "zeros_grad": lambda: torch.zeros(N, requires_grad=True),
        "randn_grad": lambda: torch.randn(64, 64, requires_grad=True),
    }


CALL_NAMES = list(_factory_calls(torch.zeros(1), torch.Generator()).keys())
_like_dependent = {n for n in CALL_NAMES if "like" in n or n.startswith("new_")}


def _run(name: str, x_name: str, scoped: bool):
    torch.manual_seed(1234)
    g = torch.Generator().manual_seed(99)
    x = _inputs()[x_name]
    call = _factory_calls(x, g)[name]
    if scoped:
        with poolscope.pool_scope(threshold=SMALL) as scope:
            out = call()
        routed = scope.stats.allocations_routed
    else:
        out, routed = call(), 0
    # What comes next from both RNG streams must match too.
    return out, torch.rand(4), torch.rand(4, generator=g), routed


@pytest.mark.parametrize("name", CALL_NAMES)
def test_factory_bit_identical(name):
    x_names = list(_inputs()) if name in _like_dependent else ["contig"]
    for x_name in x_names:
        plain = _run(name, x_name, scoped=False)
        pooled = _run(name, x_name, scoped=True)
        assert pooled[3] >= 1, f"{name} on {x_name} was not routed"
        for a, b in zip(plain[:3], pooled[:3]):
            assert_same(a, b)


def test_generator_stream_not_touched_by_default_stream():
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    with poolscope.pool_scope(threshold=0):
        a = torch.randn(N, generator=g)
    g2 = torch.Generator().manual_seed(5)
    torch.manual_seed(1)
    assert torch.equal(a, torch.randn(N, generator=g2))


@pytest.mark.parametrize(
    "call",
    [
        lambda: torch.zeros(-5, 4),
        lambda: torch.zeros(-1024, -1024),
        lambda: torch.randint(5, 2, (N,)),
        lambda: torch.empty(N, memory_format=torch.preserve_format),
        lambda: torch.full((N,), "a"),
        lambda: torch.arange(0, 10, 0),
        lambda: torch.empty_strided((64, 64), (-1, 1)),
        lambda: torch.eye(-3),
    ],
)
def test_bad_calls_raise_the_same_exception(call):
    with pytest.raises(Exception) as plain:
        call()
    with poolscope.pool_scope(threshold=0):
        with pytest.raises(type(plain.value)) as pooled:
            call()
    assert str(pooled.value) == str(plain.value)


def test_transformer_encoder_fast_path_bit_identical():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    x = torch.randn(4, 128, 64)
    with torch.no_grad():
        plain = model(x)
        with poolscope.pool_scope(threshold=0):
            pooled = model(x)
    assert_same(plain, pooled)


def test_code_that_checks_for_overrides_takes_the_same_path():
    x = torch.randn(4)
    with poolscope.pool_scope():
        assert not torch.overrides.has_torch_function((x,))
        assert not torch._C._is_torch_function_mode_enabled()
        from torch.nn.modules.activation import _is_make_fx_tracing

        assert not _is_make_fx_tracing()
