"""capture="all": op outputs come from the pool, bit-identical, released exactly, cached layouts."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import poolscope
from helpers import assert_same, assert_same_tree
from poolscope import _outputs

MiB = 1 << 20
SMALL = "4KiB"

# Each op takes the list of tensors made so far (all of shape (B, N, M) or derived) and returns one.
OPS = {
    "add": lambda ts: ts[-1] + ts[0],
    "mul_scalar": lambda ts: ts[-1] * 2.5,
    "sub_broadcast": lambda ts: ts[-1] - ts[0].mean(-1, keepdim=True),
    "div": lambda ts: ts[-1] / (ts[0].abs() + 1),
    "exp": lambda ts: torch.exp(ts[-1].clamp(max=5)),
    "tanh": lambda ts: torch.tanh(ts[-1]),
    "gelu": lambda ts: F.gelu(ts[-1]),
    "silu": lambda ts: F.silu(ts[-1]),
    "softmax": lambda ts: ts[-1].softmax(-1),
    "log_softmax_dim1": lambda ts: ts[-1].log_softmax(1),
    "sum_keepdim": lambda ts: ts[-1].sum(-1, keepdim=True).expand_as(ts[-1]) * ts[-1],
    "matmul": lambda ts: ts[-1] @ ts[0].transpose(1, 2) @ ts[0],
    "cat_split": lambda ts: torch.cat([ts[-1], ts[0]], dim=1)[:, : ts[0].shape[1]],
    "where": lambda ts: torch.where(ts[-1] > 0, ts[-1], ts[0]),
    "transpose_contiguous": lambda ts: ts[-1].transpose(1, 2).contiguous().transpose(1, 2),
    "maximum": lambda ts: torch.maximum(ts[-1], ts[0]),
    "cumsum": lambda ts: ts[-1].cumsum(1),
    "pow": lambda ts: ts[-1].abs().pow(1.5),
    "linear": lambda ts: F.linear(ts[-1], ts[0][0, : ts[0].shape[2], :].t().contiguous()),
    "to_double_and_back": lambda ts: ts[-1].double().float(),
    "channels_last_mul": lambda ts: (
        ts[-1].unsqueeze(-1).contiguous(memory_format=torch.channels_last) * 3
    ).squeeze(-1),
    "inplace_then_clone": lambda ts: ts[-1].clone().mul_(2),
    "view_ops": lambda ts: ts[-1].view(ts[-1].shape).flip(1),
}


def _run(program, layout, scoped, grad=False):
    torch.manual_seed(0)
    base = torch.randn(2, 48, 32)
    other = torch.randn(2, 48, 32)
    if layout == "transposed":
        base = base.transpose(1, 2).contiguous().transpose(1, 2)
    tensors = [base.requires_grad_(grad), other.requires_grad_(grad)]
    ctx = poolscope.pool_scope(capture="all", threshold=SMALL) if scoped else torch.enable_grad()
    with ctx:
        for name in program:
            tensors.append(OPS[name](tensors))
        loss = tensors[-1].float().sum()
    grads = torch.autograd.grad(loss, tensors[:2], allow_unused=True) if grad else ()
    return [t.detach() for t in tensors[2:]], [g for g in grads if g is not None]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    program=st.lists(st.sampled_from(sorted(OPS)), min_size=1, max_size=10),
    layout=st.sampled_from(["contiguous", "transposed"]),
    grad=st.booleans(),
)
def test_random_op_sequences_bit_identical(program, layout, grad):
    plain = _run(program, layout, scoped=False, grad=grad)
    pooled = _run(program, layout, scoped=True, grad=grad)
    for a, b in zip(plain[0], pooled[0]):
        assert_same(a, b)
    for a, b in zip(plain[1], pooled[1]):
        assert_same(a, b)


def test_outputs_are_pooled_and_released():
    pool = poolscope.TensorPool("cpu")
    x = torch.randn(512, 512)
    with poolscope.pool_scope(capture="all", pool=pool) as scope:
        y = x @ x  # 1 MiB output
        z = (y * 2).softmax(-1)
        del y
    assert scope.stats.allocations_routed == 3
    assert pool.stats().blocks_in_use == 1
    del z
    assert pool.stats().blocks_in_use == 0


def test_views_inplace_multi_output_dynamic_and_out_calls_pass_through():
    pool = poolscope.TensorPool("cpu")
    x = torch.randn(1024, 1024)
    out = torch.empty(1024, 1024)
    mask = x > 0
    with poolscope.pool_scope(capture="all", pool=pool) as scope:
        x.t()  # a view
        x.view(-1)
        x.mul_(1.0)  # in place
        torch.sort(x, dim=-1)  # two outputs
        torch.nonzero(mask)  # data-dependent shape
        torch.add(x, 1, out=out)  # out= call
        torch.ops.aten.relu.default(x)  # relu.out has no CPU kernel of its own: skipped
        flat = torch.ops.aten._unsafe_view.default(x, [1024 * 1024])  # shares x's storage
    assert scope.stats.allocations_routed == 0
    assert flat.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert _outputs.output_plan(torch.ops.aten._unsafe_view.default) is None


def test_a_repeated_forward_pays_no_meta_computation(monkeypatch):
    calls = []
    original = _outputs._meta_layout

    def counting(*args):
        calls.append(args[0])
        return original(*args)

    monkeypatch.setattr(_outputs, "_meta_layout", counting)
    model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256)).eval()
    x = torch.randn(512, 256)
    with torch.no_grad():
        with poolscope.pool_scope(capture="all"):
            first = model(x)
        computed = len(calls)
        with poolscope.pool_scope(capture="all"):
            second = model(x)
    assert computed > 0 and len(calls) == computed
    assert_same(first, second)


def test_small_ops_leave_before_any_layout_work(monkeypatch):
    calls = []
    monkeypatch.setattr(_outputs, "_meta_layout", lambda *a: calls.append(a))
    x = torch.randn(16, 16)
    with poolscope.pool_scope(capture="all"):
        for _ in range(10):
            x = (x * 1.01).tanh()
    assert calls == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_real_modules_bit_identical_under_capture_all(dtype):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 256, batch_first=True, dropout=0.0)
    modules = [
        (nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval(), (torch.randn(2, 256, 64),)),
        (nn.MultiheadAttention(64, 4, batch_first=True).eval(), (torch.randn(2, 256, 64),) * 3),
        (nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU()).eval(), (torch.randn(2, 8, 64, 64).to(memory_format=torch.channels_last),)),
        (nn.LSTM(32, 64, batch_first=True).eval(), (torch.randn(4, 128, 32),)),
        (nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)), (torch.randn(512, 64),)),
    ]
    for module, inputs in modules:
        module = module.to(dtype)
        inputs = tuple(t.to(dtype) for t in inputs)
        with torch.no_grad():
            plain = module(*inputs)
            with poolscope.pool_scope(capture="all", threshold=SMALL):
                pooled = module(*inputs)
        assert_same_tree(plain, pooled)


def test_training_with_capture_all_is_bit_identical_and_leak_free():
    def train(pooled):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(128, 512), nn.GELU(), nn.Dropout(0.1), nn.Linear(512, 128))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        x = torch.randn(256, 128)
        for _ in range(3):
            opt.zero_grad()
            if pooled:
                with poolscope.pool_scope(capture="all", threshold=SMALL):
                    loss = model(x).square().mean()
            else:
                loss = model(x).square().mean()
            loss.backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    before = poolscope.get_pool().stats().bytes_in_use
    assert_same_tree(train(True), train(False))
    gc.collect()
    assert poolscope.get_pool().stats().bytes_in_use == before


def test_loop_in_flat_memory_and_innermost_capture_governs():
    pool = poolscope.TensorPool("cpu")
    x = torch.randn(1024, 256)
    with poolscope.pool_scope(capture="all", pool=pool):
        for _ in range(20):
            y = (x @ x.t()).softmax(-1)
            del y
        with poolscope.pool_scope(pool=pool) as factories_only:
            z = x @ x.t()
        del z
    stats = pool.stats()
    assert stats.misses == 2 and stats.hits == 38
    assert factories_only.stats.allocations_routed == 0


def test_output_device_rules():
    walk = _outputs._Walk()
    walk.key((torch.randn(3), torch.tensor(2.0)))
    assert walk.output_device() == torch.device("cpu") and walk.ok
    walk = _outputs._Walk()
    walk.key(torch.randn(3, device="meta"))
    assert not walk.ok
    walk = _outputs._Walk()
    walk.key((torch.randn(3), torch.Generator()))
    assert not walk.ok
