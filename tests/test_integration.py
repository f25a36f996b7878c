"""poolscope on real PyTorch machinery: training, inference, real modules, compile, modes, DDP.

Every test runs the same code with and without poolscope and compares bit for bit.
"""

from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import poolscope
from conftest import needs_compile, needs_spawn
from helpers import MiB, assert_same, assert_same_tree



class NoisyMLP(nn.Module):
    """An MLP whose forward makes large buffers: dropout masks, randn_like noise, a zeros scratch."""

    def __init__(self, width: int = 512, enable_memory_pool: bool = True) -> None:
        super().__init__()
        self.enable_memory_pool = enable_memory_pool
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)
        self.drop = nn.Dropout(0.1)

    @poolscope.pooled_forward(threshold="256KiB")
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = h + 0.01 * torch.randn_like(h)
        scratch = torch.zeros_like(h)
        scratch.add_(F.gelu(h))
        return self.fc2(self.drop(scratch))


def _train(pooled: bool, optimizer_cls, steps: int = 3, backward_inside: bool = False):
    torch.manual_seed(0)
    model = NoisyMLP(enable_memory_pool=pooled)
    opt = optimizer_cls(model.parameters(), lr=1e-3)
    x = torch.randn(256, 512)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        if backward_inside and pooled:
            with poolscope.pool_scope():
                loss = model(x).square().mean()
                loss.backward()
        else:
            loss = model(x).square().mean()
            loss.backward()
        opt.step()
        losses.append(loss.detach())
    return model, losses


@pytest.mark.pools
@pytest.mark.parametrize("optimizer_cls", [torch.optim.SGD, torch.optim.Adam])
@pytest.mark.parametrize("backward_inside", [False, True])
def test_training_is_bit_identical_and_gives_every_block_back(optimizer_cls, backward_inside):
    before = poolscope.get_pool().stats()
    pooled_model, pooled_losses = _train(True, optimizer_cls, backward_inside=backward_inside)
    plain_model, plain_losses = _train(False, optimizer_cls)
    assert poolscope.get_pool().stats().hits + poolscope.get_pool().stats().misses > before.hits + before.misses
    assert_same_tree(pooled_losses, plain_losses)
    for (name, a), (_, b) in zip(pooled_model.named_parameters(), plain_model.named_parameters()):
        assert torch.equal(a, b), name
        assert torch.equal(a.grad, b.grad), name
    del pooled_model, pooled_losses
    assert poolscope.get_pool().stats().bytes_in_use == before.bytes_in_use


@pytest.mark.pools
def test_saved_tensors_keep_their_blocks_until_backward():
    torch.manual_seed(0)
    model = NoisyMLP()
    x = torch.randn(256, 512)
    before = poolscope.get_pool().stats().blocks_in_use
    loss = model(x).sum()
    held = poolscope.get_pool().stats().blocks_in_use - before
    assert held >= 1  # the graph holds pooled tensors
    loss.backward()
    del loss
    assert poolscope.get_pool().stats().blocks_in_use == before


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_inference_contexts_inside_and_around_scopes(context):
    torch.manual_seed(0)
    model = NoisyMLP().eval()
    x = torch.randn(256, 512)
    ctx = getattr(torch, context)
    with ctx():
        torch.manual_seed(1)
        plain = NoisyMLP.forward.__wrapped__(model, x)
        torch.manual_seed(1)
        around = model(x)
    torch.manual_seed(1)
    with poolscope.pool_scope():
        with ctx():
            inside = model(x)
    for out in (around, inside):
        assert_same(out, plain)


def _modules():
    torch.manual_seed(0)
    enc_layer = nn.TransformerEncoderLayer(64, 4, 256, batch_first=True, dropout=0.0)
    return {
        "transformer_encoder": (
            nn.TransformerEncoder(enc_layer, 2, enable_nested_tensor=False).eval(),
            lambda dt: (torch.randn(4, 256, 64, dtype=dt),),
        ),
        "multihead_attention": (
            nn.MultiheadAttention(64, 4, batch_first=True).eval(),
            lambda dt: (torch.randn(2, 512, 64, dtype=dt),) * 3,
        ),
        "conv_channels_last": (
            nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 16, 3)).eval(),
            lambda dt: (torch.randn(4, 16, 64, 64, dtype=dt).to(memory_format=torch.channels_last),),
        ),
        "lstm": (nn.LSTM(64, 128, num_layers=2, batch_first=True).eval(), lambda dt: (torch.randn(8, 256, 64, dtype=dt),)),
        "mlp": (nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256)), lambda dt: (torch.randn(512, 256, dtype=dt),)),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", list(_modules()))
def test_real_modules_bit_identical(name, dtype):
    module, make_inputs = _modules()[name]
    module = module.to(dtype)
    inputs = make_inputs(dtype)
    with torch.no_grad():
        plain = module(*inputs)
        with poolscope.pool_scope(threshold=0):
            pooled = module(*inputs)
    assert_same_tree(plain, pooled)


@pytest.mark.pools
def test_scaled_dot_product_attention_with_pooled_inputs_and_masks():
    torch.manual_seed(0)
    plain_in = [torch.randn(1, 8, 1024, 64) for _ in range(3)]
    mask = torch.ones(1024, 1024, dtype=torch.bool).tril()
    plain = F.scaled_dot_product_attention(*plain_in, attn_mask=mask)
    torch.manual_seed(0)
    with poolscope.pool_scope() as scope:
        pooled_in = [torch.randn(1, 8, 1024, 64) for _ in range(3)]
        pooled_mask = torch.ones(1024, 1024, dtype=torch.bool).tril()
        pooled = F.scaled_dot_product_attention(*pooled_in, attn_mask=pooled_mask)
    assert scope.stats.allocations_routed >= 5  # the inputs, the mask and the output at least
    assert_same(plain, pooled)


# --- torch.compile -----------------------------------------------------------------------------


def _scratch_fn(x):
    buf = torch.zeros(x.shape[0], 1024)
    return (buf + x[:, None]).relu()  # 4 MiB: Inductor allocates it through the CPU allocator


@pytest.mark.pools
@needs_compile
@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compiled_function_inside_a_scope_compiles_and_matches(backend):
    x = torch.randn(1024)
    torch._dynamo.reset()
    compiled = torch.compile(_scratch_fn, backend=backend)
    plain = compiled(x)
    with poolscope.pool_scope() as scope:
        pooled = compiled(x)
    assert_same(plain, pooled)
    assert scope.stats.allocations_routed >= 1  # Inductor's buffers included: they come from the allocator


@needs_compile
def test_compiling_inside_a_scope_traces_one_graph_without_breaks():
    torch._dynamo.reset()
    with poolscope.pool_scope():
        explanation = torch._dynamo.explain(_scratch_fn)(torch.randn(1024))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0)


class Compiled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 64)

    @poolscope.pooled_forward
    def forward(self, x):
        buf = torch.zeros(x.shape[0], 4096)
        return self.lin(x) + buf[:, :64]


@needs_compile
@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_decorated_forward_compiles_without_graph_breaks(backend):
    torch.manual_seed(0)
    model = Compiled()
    x = torch.randn(512, 64)
    eager = model(x)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    out = compiled(x)
    if backend == "inductor":
        torch.testing.assert_close(out, eager)
    else:
        assert_same(out, eager)


# --- other modes and tools --------------------------------------------------------------------


def test_flop_counter_counts_the_same():
    from torch.utils.flop_counter import FlopCounterMode

    model = nn.Sequential(nn.Linear(512, 2048), nn.ReLU(), nn.Linear(2048, 512))
    x = torch.randn(256, 512)
    with FlopCounterMode(display=False) as plain_counter:
        plain = model(x)
    with FlopCounterMode(display=False) as outer_counter:
        with poolscope.pool_scope(threshold=0):
            pooled = model(x)
    with poolscope.pool_scope(threshold=0):
        with FlopCounterMode(display=False) as inner_counter:
            inner = model(x)
    assert plain_counter.get_total_flops() == outer_counter.get_total_flops() == inner_counter.get_total_flops()
    assert_same(plain, pooled)
    assert_same(plain, inner)


def test_meta_and_fake_never_routed():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with poolscope.pool_scope() as scope:
        with torch.device("meta"):
            m = nn.Linear(4096, 4096)
        with FakeTensorMode():
            f = torch.randn(4096, 4096) @ torch.randn(4096, 4096)
    assert m.weight.is_meta and type(f).__name__ == "FakeTensor"
    assert scope.stats.allocations_routed == 0


def test_profiler_records_pooled_work():
    with torch.profiler.profile() as prof:
        with poolscope.pool_scope(name="profiled"):
            (torch.randn(MiB) * 2).sum()
    names = [e.name for e in prof.events()]
    assert "poolscope:profiled" in names and "aten::normal_" in names


def test_saved_tensors_hooks_activation_offloading():
    def pack(t):
        return t.detach().clone()  # an offloaded copy (a CPU "offload" here)

    def unpack(t):
        return t

    def run(pooled):
        torch.manual_seed(0)
        model = NoisyMLP(enable_memory_pool=pooled)
        x = torch.randn(256, 512, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            loss = model(x).sum()
        loss.backward()
        return x.grad, [p.grad for p in model.parameters()]

    assert_same_tree(run(True), run(False))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing(use_reentrant):
    from torch.utils.checkpoint import checkpoint

    def run(pooled):
        torch.manual_seed(0)
        model = NoisyMLP(enable_memory_pool=pooled)
        model.drop.p = 0.0  # recomputation must see the same mask; dropout RNG is replayed anyway
        x = torch.randn(256, 512, requires_grad=True)
        loss = checkpoint(model, x, use_reentrant=use_reentrant).sum()
        loss.backward()
        return loss.detach(), x.grad, [p.grad for p in model.parameters()]

    assert_same_tree(run(True), run(False))


# --- wrapping a model you did not write --------------------------------------------------------


def test_pooling_a_module_instance_and_undoing_it():
    torch.manual_seed(0)
    pretrained = nn.TransformerEncoderLayer(128, 4, 512, batch_first=True, dropout=0.0).eval()
    other = copy.deepcopy(pretrained)
    x = torch.randn(2, 512, 128)
    expected = other(x)
    assert poolscope.pooled_forward(pretrained, threshold="64KiB", name="pretrained") is pretrained
    poolscope.reset_report()
    out = pretrained(x)
    assert_same(out, expected)
    assert "pretrained" in poolscope.report()
    with pytest.raises(ValueError, match=r"already pooled; call poolscope.unpool\(module\) first"):
        poolscope.pooled_forward(pretrained)
    other(x)  # another instance of the class is untouched
    assert poolscope.report().count("pretrained") == 1
    poolscope.unpool(pretrained)
    assert "forward" not in pretrained.__dict__
    assert_same(pretrained(x), expected)
    with pytest.raises(ValueError, match=r"was not pooled"):
        poolscope.unpool(pretrained)
    with pytest.raises(TypeError, match=r"unpool takes an nn.Module; got 3"):
        poolscope.unpool(3)
    poolscope.reset_report()


@pytest.mark.pools
def test_instance_switch_applies_to_wrapped_instances():
    def routed(module):
        before = poolscope.get_pool().stats()
        module(torch.randn(64, 512))
        after = poolscope.get_pool().stats()
        return after.hits + after.misses - before.hits - before.misses

    plain = nn.Sequential(nn.Linear(512, 4096), nn.ReLU())
    switched_off = poolscope.pooled_forward(nn.Sequential(nn.Linear(512, 4096), nn.ReLU()), threshold=0)
    switched_off.enable_memory_pool = False
    switched_on = poolscope.pooled_forward(nn.Sequential(nn.Linear(512, 4096), nn.ReLU()), threshold=0)
    assert routed(plain) == 0 and routed(switched_off) == 0
    assert routed(switched_on) == 2  # the Linear's and the ReLU's 1 MiB outputs


# --- distributed -------------------------------------------------------------------------------


def _ddp_worker(rank, world, init_file, pooled, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DDP(NoisyMLP(width=256, enable_memory_pool=pooled))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(1 + rank)
    x = torch.randn(128, 256)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    stats = poolscope.get_pool().stats()
    torch.save(
        {"params": [p.detach() for p in model.parameters()], "routed": stats.hits + stats.misses},
        os.path.join(out_dir, f"{'pooled' if pooled else 'plain'}{rank}.pt"),
    )
    dist.destroy_process_group()


@pytest.mark.pools
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
@needs_spawn
def test_ddp_two_processes_gloo():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        for pooled in (True, False):
            init_file = os.path.join(out_dir, f"init_{pooled}")
            mp.spawn(_ddp_worker, args=(2, init_file, pooled, out_dir), nprocs=2, join=True)
        results = {
            name: torch.load(os.path.join(out_dir, f"{name}.pt"))
            for name in ("pooled0", "pooled1", "plain0", "plain1")
        }
    for rank in (0, 1):
        assert results[f"pooled{rank}"]["routed"] > 0  # each rank pooled in its own process
        assert results[f"plain{rank}"]["routed"] == 0
        assert_same_tree(results[f"pooled{rank}"]["params"], results[f"plain{rank}"]["params"])
    assert_same_tree(results["pooled0"]["params"], results["pooled1"]["params"])  # DDP kept ranks in sync


def _longnet_encoder() -> nn.Module:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("longnet_example", Path(__file__).parent.parent / "examples" / "longnet.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    encoder = module.LongNetEncoder().eval()
    module.set_memory_pool(encoder, False)  # no decorators: only the newcomer's one scope
    return encoder


@pytest.mark.pools
@pytest.mark.parametrize("name", ["mlp_2mib_outputs_with_grad", "transformer_encoder_with_grad", "longnet_encoder"])
def test_the_readme_one_liner_pools_what_a_newcomer_tries_first(name):
    # The first release's default pooled nothing on these three (issue 14).
    torch.manual_seed(0)
    if name == "mlp_2mib_outputs_with_grad":
        model, x = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024)), torch.randn(512, 256)
    elif name == "transformer_encoder_with_grad":
        layer = nn.TransformerEncoderLayer(64, 4, 256, batch_first=True, dropout=0.0)
        model, x = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), torch.randn(4, 1024, 64)
    else:
        model, x = _longnet_encoder(), torch.randn(1, 4096, 192)
    plain = model(x)
    with poolscope.pool_scope() as scope:
        out = model(x)
    assert scope.stats.allocations_routed > 0
    assert_same(out, plain)
