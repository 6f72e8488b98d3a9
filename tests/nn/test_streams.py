"""nn.streams: the layout belongs to the call (thread, asyncio task), exits in any order, checkpoint recomputation
through the public helpers, torch.compile through the per-thread mirror, the rounded-adapter scope, and an import
that leaves torch's global state alone."""
import asyncio
import contextlib
import gc
import subprocess
import sys
import threading
import weakref

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import CheckpointError, checkpoint

import hydra_kernels as hk
from hydra_kernels.nn import bind_streams, checkpoint_context_fn, context, rounded_adapters

from tests._util import ROOT


def make_block(K=13, N=11, seed=0, adapters=("actor", "critic")):
    """HydraLinear -> Tanh -> HydraLinear (non-zero adapters: every stream computes something else)."""
    torch.manual_seed(seed)
    block = nn.Sequential(hk.HydraLinear.from_linear(nn.Linear(K, N), adapters=adapters, r=4, alpha=8), nn.Tanh(),
                          hk.HydraLinear.from_linear(nn.Linear(N, N), adapters=adapters, r=4, alpha=8))
    with torch.no_grad():
        for layer in (block[0], block[2]):
            layer.lora_B.normal_()
    return block


def run(block, x, *names):
    """block's output for x repeated once per stream, under streams(block, *names)."""
    with hk.streams(block, *names):
        return block(x.repeat(len(names), 1))


@pytest.fixture
def switch_often():
    """Switch threads every few microseconds, so that two threads interleave inside their contexts."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------ nesting and exits
def test_exits_in_any_order_restore_exactly():
    block = make_block()
    layer = block[0]
    a, b, c = hk.streams(block, "actor"), hk.streams(block, "critic", "base"), hk.streams(layer, "base")
    assert layer.current_layout() == ("actor",)            # default: the first adapter
    a.__enter__()
    b.__enter__()
    c.__enter__()
    assert layer.current_layout() == ("base",) and block[2].current_layout() == ("critic", "base")
    b.__exit__(None, None, None)                            # the middle one first
    assert layer.current_layout() == ("base",) and block[2].current_layout() == ("actor",)
    a.__exit__(None, None, None)
    assert layer.current_layout() == ("base",) and block[2].current_layout() == ("actor",)
    c.__exit__(None, None, None)
    assert layer.current_layout() == ("actor",) and block[2].current_layout() == ("actor",)
    assert context.snapshot() == ()


def test_innermost_covering_context_decides_and_outputs_follow():
    block = make_block()
    x = torch.randn(4, 13)
    hk.set_default_stream(block, "base")
    plain = {names: run(block, x, *names) for names in [("actor",), ("critic", "base")]}
    with hk.streams(block, "critic", "base"):
        with hk.streams(block[2], "actor"):                # a submodule: only its layers
            assert block[0].current_layout() == ("critic", "base") and block[2].current_layout() == ("actor",)
        assert torch.equal(block(x.repeat(2, 1)), plain[("critic", "base")])
        with hk.streams(block, "actor") as names:
            assert names == ("actor",)
            assert torch.equal(block(x), plain[("actor",)])
        assert torch.equal(block(x.repeat(2, 1)), plain[("critic", "base")])
    assert block[0].current_layout() == ("base",)          # set_default_stream: a persistent layer setting


def test_names_are_validated_before_anything_changes():
    block = make_block()
    block[2] = hk.HydraLinear.from_linear(nn.Linear(11, 11), adapters=("actor",), r=4)   # no "critic" here
    with hk.streams(block, "base"):
        with pytest.raises(ValueError, match="^streams: unknown stream 'critic'"):
            with hk.streams(block, "critic"):
                pass
        assert block[0].current_layout() == ("base",) and block[2].current_layout() == ("base",)
    with pytest.raises(ValueError, match="^names:"):
        with hk.streams(block):
            pass
    assert context.snapshot() == ()


def test_an_exception_inside_the_context_still_removes_it():
    block = make_block()
    with pytest.raises(KeyError):
        with hk.streams(block, "critic"):
            raise KeyError
    assert block[0].current_layout() == ("actor",) and context.snapshot() == ()


# ------------------------------------------------------------------------------------ threads and asyncio tasks
def _patched_model():
    from tests.integrations._models import ALPHA, R, batch, make_model, randomize_adapters
    model = make_model("llama")
    hk.patch_model(model, adapters=("actor", "critic"), r=R, alpha=ALPHA)
    randomize_adapters(model)
    return model, batch(B=2, T=5)


LAYOUTS = [("base",), ("critic", "actor"), None]          # None: no context (the default stream)


def _logits(model, ids, mask, names):
    n = 1 if names is None else len(names)
    with (hk.streams(model, *names) if names is not None else contextlib.nullcontext()), torch.no_grad():
        return model(input_ids=ids.repeat(n, 1), attention_mask=mask.repeat(n, 1), use_cache=False).logits


def test_threads_on_one_model_each_get_their_own_layout(switch_often):
    model, (ids, mask) = _patched_model()
    refs = [_logits(model, ids, mask, names) for names in LAYOUTS]
    assert not torch.equal(refs[0], refs[1][:2]) and not torch.equal(refs[0], refs[2])
    start, wrong, errors = threading.Barrier(len(LAYOUTS)), [0] * len(LAYOUTS), []

    def work(i):
        try:
            start.wait()
            for _ in range(150):
                wrong[i] += not torch.equal(_logits(model, ids, mask, LAYOUTS[i]), refs[i])
        except Exception as e:                               # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(LAYOUTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and wrong == [0] * len(LAYOUTS)


def test_asyncio_tasks_each_get_their_own_layout():
    model, (ids, mask) = _patched_model()
    refs = {names: _logits(model, ids, mask, names) for names in LAYOUTS}

    def _logits_here(n=1):
        with torch.no_grad():
            return model(input_ids=ids.repeat(n, 1), attention_mask=mask.repeat(n, 1), use_cache=False).logits

    async def task(names, steps=30):
        with (hk.streams(model, *names) if names is not None else contextlib.nullcontext()):
            for _ in range(steps):
                await asyncio.sleep(0)                       # the other tasks run, inside their own contexts
                assert torch.equal(_logits_here(1 if names is None else len(names)), refs[names])
        return True

    async def parent():
        with hk.streams(model, "critic", "actor"):
            child = asyncio.create_task(inherits())          # created inside: starts from this layout
            await asyncio.sleep(0)
            with hk.streams(model, "base"):
                await asyncio.sleep(0)
                assert torch.equal(_logits_here(), refs[("base",)])
            assert await child
            assert torch.equal(_logits_here(n=2), refs[("critic", "actor")])   # the child's context did not leak
        return True

    async def inherits():
        assert torch.equal(_logits_here(n=2), refs[("critic", "actor")])
        with hk.streams(model, "base"):
            await asyncio.sleep(0)
            assert torch.equal(_logits_here(), refs[("base",)])
        await asyncio.sleep(0)
        return torch.equal(_logits_here(n=2), refs[("critic", "actor")])

    async def main():
        return await asyncio.gather(*(task(names) for names in LAYOUTS), parent())
    assert all(asyncio.run(main()))


# ---------------------------------------------------------------------------------------- activation checkpointing
def _weighted(out):
    return (out * torch.arange(out.numel()).reshape(out.shape)).sum()


CHECKPOINTS = {
    "none": lambda fn, x: fn(x),
    "context_fn": lambda fn, x: checkpoint(fn, x, use_reentrant=False, context_fn=checkpoint_context_fn),
    "bind_streams": lambda fn, x: checkpoint(bind_streams(fn), x, use_reentrant=False),
    "bind_streams-reentrant": lambda fn, x: checkpoint(bind_streams(fn), x, use_reentrant=True),
}


def _layer_grads(block, x, how, layouts):
    """Forwards under each layout (a no-grad forward under yet another one after each), then one backward
    outside every context: (x grads, lora_A grads, lora_B grads)."""
    block.zero_grad(set_to_none=True)
    xs, loss = [], 0
    for names in layouts:
        xg = x.repeat(len(names), 1).requires_grad_(True)  # reentrant checkpoint needs an input that requires grad
        with hk.streams(block, *names):
            loss = loss + _weighted(CHECKPOINTS[how](block, xg))
            with torch.no_grad(), hk.streams(block, "base"):
                block(x)
        xs.append(xg)
    hk.set_default_stream(block, "base")
    loss.backward()
    hk.set_default_stream(block, "actor")
    return ([xg.grad for xg in xs], [l.lora_A.grad.clone() for l in (block[0], block[2])],
            [l.lora_B.grad.clone() for l in (block[0], block[2])])


@pytest.mark.parametrize("how", ["context_fn", "bind_streams", "bind_streams-reentrant"])
@pytest.mark.parametrize("layouts", [[("critic", "actor")], [("critic", "actor"), ("actor", "base"), ("critic",)]])
def test_checkpoint_recomputes_with_the_forward_layout(how, layouts):
    block = make_block()
    x = torch.randn(6, 13)
    plain = _layer_grads(block, x, "none", layouts)
    ckpt = _layer_grads(block, x, how, layouts)
    for a, b in zip(plain, ckpt):
        for ga, gb in zip(a, b):
            torch.testing.assert_close(gb, ga)
    assert all(torch.count_nonzero(g[i]) > 0 for g in plain[1] for i in range(2))     # both adapters trained


def test_recomputation_under_another_layout_raises():
    block = make_block()
    x = torch.randn(6, 13)
    for forward, backward, error in [(("critic", "actor"), ("actor", "critic"), RuntimeError),
                                     (("critic", "actor"), ("actor",), CheckpointError)]:
        xg = x.repeat(2, 1).requires_grad_(True)
        with hk.streams(block, *forward):
            out = checkpoint(block, xg, use_reentrant=False)              # no helper: recomputes in backward's
        with hk.streams(block, *backward):
            with pytest.raises(error, match="recomputation ran stream adapters|different metadata"):
                out.sum().backward()
    # The plain backward of a forward under another layout than the current one is fine (nothing recomputed).
    with hk.streams(block, "critic", "actor"):
        out = block(x.repeat(2, 1))
    out.sum().backward()


def test_bind_streams_restores_the_callers_layout():
    block = make_block()
    with hk.streams(block, "critic"):
        seen = bind_streams(lambda: block[0].current_layout())
    with hk.streams(block, "base", "actor"):
        assert seen() == ("critic",) and block[0].current_layout() == ("base", "actor")
    assert seen() == ("critic",) and block[0].current_layout() == ("actor",)


# ----------------------------------------------------------------------------------------------- torch.compile
COMPILE_LAYOUTS = [("actor",), ("base", "critic"), ("critic", "actor", "base")]


def close(compiled_out, eager_out) -> bool:
    """Inductor's fused kernels round differently from eager: equal to 1e-5 (other layouts differ by > 0.1)."""
    return torch.allclose(compiled_out, eager_out, rtol=1e-5, atol=1e-5)


def test_compiled_forward_one_graph_per_layout_no_recompiles(fresh_dynamo):
    block = make_block()
    x = torch.randn(4, 13)
    compiled = torch.compile(block, fullgraph=True, dynamic=False)
    start = fresh_dynamo["stats"]["unique_graphs"]
    with torch.no_grad():
        for rep in range(2):
            for names in COMPILE_LAYOUTS:
                with hk.streams(block, *names):
                    assert close(compiled(x.repeat(len(names), 1)), block(x.repeat(len(names), 1)))
            if rep == 0:
                graphs = fresh_dynamo["stats"]["unique_graphs"]
                assert graphs - start == len(COMPILE_LAYOUTS)
        assert fresh_dynamo["stats"]["unique_graphs"] == graphs       # the second pass recompiled nothing
        with hk.streams(block, "actor"), hk.streams(block[2], "critic"):   # nested: per-layer layouts traced
            nested = compiled(x)
            assert close(nested, block(x))
        assert close(compiled(x), block(x)) and not close(compiled(x), nested)   # the default stream


def test_compiled_forward_in_two_threads(fresh_dynamo, switch_often):
    block = make_block()
    x = torch.randn(4, 13)
    compiled = torch.compile(block, fullgraph=True, dynamic=False)
    layouts = [("actor", "base"), ("base", "critic")]
    refs = [run(block, x, *names) for names in layouts]
    assert not close(*refs)
    with torch.no_grad():
        for names in layouts:                               # compile both graphs first, in this thread
            run(compiled, x, *names)
    start, wrong, errors = threading.Barrier(2), [0, 0], []

    def work(i):
        try:
            start.wait()
            for _ in range(200):
                with torch.no_grad():
                    wrong[i] += not close(run(compiled, x, *layouts[i]), refs[i])
        except Exception as e:                               # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and wrong == [0, 0]


@pytest.mark.parametrize("fullgraph", [True, False])
def test_compiled_forward_raises_when_two_tasks_of_a_thread_are_inside_streams(fresh_dynamo, fullgraph):
    """Compiled code sees one layout per thread: with two asyncio tasks inside streams() at once it cannot tell
    whose forward it runs. fullgraph: an error naming the cause; otherwise Dynamo falls back to the eager
    forward, which reads the task's own layout."""
    block = make_block()
    x = torch.randn(4, 13)
    compiled = torch.compile(block, fullgraph=fullgraph, dynamic=False)
    refs = {names: run(block, x, *names) for names in [("actor",), ("critic",)]}
    with torch.no_grad():
        assert close(run(compiled, x, "critic"), refs[("critic",)])

    async def task(names, entered, other):
        with hk.streams(block, *names):
            entered.set()
            await other.wait()                               # both tasks are inside streams() now
            with torch.no_grad():
                if fullgraph:
                    with pytest.raises(Exception, match="cannot tell which stream layout"):
                        compiled(x)
                else:
                    assert close(compiled(x), refs[names])
                assert torch.equal(block(x), refs[names])    # eager forwards stay right
            await asyncio.sleep(0)

    async def main():
        a, b = asyncio.Event(), asyncio.Event()
        await asyncio.gather(task(("actor",), a, b), task(("critic",), b, a))
    asyncio.run(main())
    with torch.no_grad():                                    # all exited: trusted again
        assert close(run(compiled, x, "actor"), refs[("actor",)])


def test_compiled_forward_in_a_task_of_its_own(fresh_dynamo):
    """One task inside streams() (under a context of the code that started the loop): compiled code is right;
    a child task that enters streams() while its parent is inside one makes compiled forwards raise."""
    block = make_block()
    x = torch.randn(4, 13)
    compiled = torch.compile(block, fullgraph=True, dynamic=False)

    async def one():
        with hk.streams(block, "critic"):
            await asyncio.sleep(0)
            with torch.no_grad():
                return compiled(x)

    async def parent_and_child():
        with hk.streams(block, "critic"):
            async def child():
                with hk.streams(block, "base"):
                    await asyncio.sleep(0)
            task = asyncio.create_task(child())
            await asyncio.sleep(0)                            # the child is inside its context now
            with torch.no_grad(), pytest.raises(Exception, match="cannot tell which stream layout"):
                compiled(x)
            await task
    with hk.streams(block, "base"):
        assert close(asyncio.run(one()), run(block, x, "critic"))
        asyncio.run(parent_and_child())


# ------------------------------------------------------------------------------------------- rounded adapters
def make_bf16_layer():
    layer = hk.HydraLinear.from_linear(nn.Linear(13, 11).bfloat16(), r=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    assert layer.lora_A.dtype == torch.float32
    return layer


def test_rounded_adapters_reused_inside_the_scope_and_dropped_at_exit():
    layer, other = make_bf16_layer(), make_bf16_layer()
    x = torch.randn(3, 13).bfloat16()
    with torch.no_grad():
        per_call = layer(x)                                   # outside any scope: rounded on the call
        assert context.rounded_operands(layer, torch.bfloat16)[0] is layer.lora_A
        with rounded_adapters(layer):
            A16, B16 = context.rounded_operands(layer, torch.bfloat16)
            assert A16.dtype == B16.dtype == torch.bfloat16
            assert torch.equal(A16, layer.lora_A.bfloat16()) and torch.equal(B16, layer.lora_B.bfloat16())
            assert torch.equal(layer(x), per_call)            # the same numbers
            assert context.rounded_operands(layer, torch.bfloat16)[0] is A16     # made once, reused
            assert context.rounded_operands(other, torch.bfloat16)[0] is other.lora_A   # not inside the module
            seen_elsewhere = []
            t = threading.Thread(target=lambda: seen_elsewhere.append(context.rounded_operands(layer, torch.bfloat16)))
            t.start()
            t.join()
            assert seen_elsewhere[0][0] is layer.lora_A       # another thread: not its scope
            held = weakref.ref(A16)
        del A16, B16
        gc.collect()
        assert held() is None                                 # the copy did not outlive the scope
        assert context.rounded_operands(layer, torch.bfloat16)[0] is layer.lora_A


def test_rounded_adapters_follow_in_place_updates_and_new_tensors():
    layer = make_bf16_layer()
    x = torch.randn(3, 13).bfloat16()
    with torch.no_grad(), rounded_adapters(layer):
        before = layer(x)
        A16 = context.rounded_operands(layer, torch.bfloat16)[0]
        layer.lora_B.mul_(2)                                  # in place: the version counter moves
        doubled = layer(x)
        assert not torch.equal(doubled, before)
        assert context.rounded_operands(layer, torch.bfloat16)[0] is not A16
        layer.lora_B.data = layer.lora_B.data * 0.5          # a new tensor: another data pointer
        assert torch.equal(layer(x), before)
    with torch.no_grad():
        assert torch.equal(layer(x), before)
    with rounded_adapters(layer):                             # grad mode: the parameters, for gradients
        y = layer(x)
        y.float().sum().backward()
    assert layer.lora_B.grad.dtype == torch.float32 and torch.equal(y.detach(), before)


def test_rounded_adapters_raises_without_hydra_layers():
    with pytest.raises(ValueError, match="^module:"):
        with rounded_adapters(nn.Linear(2, 2)):
            pass


# ------------------------------------------------------------------------------------------------ global state
def test_import_changes_no_global_torch_state():
    """A fresh interpreter: the registries of global optimizer and module hooks, grad mode and the default
    dtype are the same before and after `import hydra_kernels` (and its nn, integrations and rlhf packages)."""
    code = """
import torch, torch.optim.optimizer as opt, torch.nn.modules.module as mod
def state():
    # Test-only reads of torch's private registries: torch has no public listing of global hooks.
    hooks = {n: len(getattr(o, n)) for o in (opt, mod) for n in dir(o)
             if n.startswith("_global_") and n.endswith("hooks")}
    return hooks, torch.is_grad_enabled(), torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled()
before = state()
assert any(before[0]), before
import hydra_kernels, hydra_kernels.nn, hydra_kernels.integrations, hydra_kernels.rlhf.rollout
assert state() == before, (before, state())
print("ok", sorted(before[0]))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "_global_optimizer_post_hooks" in out.stdout
