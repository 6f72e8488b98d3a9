"""generate(..., compile=True): a fixed-size KV cache and a torch.compiled decoding step (CUDA graphs on a GPU)
give the same rollout as the eager loop: same sampled tokens, masks and EOS handling, per variant (patched
streams and unpatched models), and a second rollout reuses the compiled step."""
import pytest
import torch

from hydra_kernels.rlhf.config import PPOConfig
from hydra_kernels.rlhf.data import tokenize_prompts
from hydra_kernels.rlhf import build_ppo_models, new_reward_head
from hydra_kernels.rlhf.rollout import generate
from tests.rlhf._tiny import CharTokenizer, tiny_model
from tests.rlhf.test_rollout_scoring import _randomize_adapters

TOK = CharTokenizer()
PROMPTS = ["12+3=", "1+1=", "99+99=", "7+0="]                # different lengths: left padding


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _models(variant):
    model = tiny_model(len(TOK))
    models = build_ppo_models(model, new_reward_head(model, torch.Generator().manual_seed(1)),
                              PPOConfig(variant=variant, lora={"r": 4, "alpha": 8}))
    if models.shared:
        _randomize_adapters(models.model)                   # the actor differs from the reference
    # EOS likely, so that some rows stop early and are padded while others run on.
    with torch.no_grad():
        for m in {id(h.model): h.model for h in models.policies().values()}.values():
            m.get_output_embeddings().weight[TOK.eos_token_id] *= 0.0
            m.get_output_embeddings().weight[TOK.eos_token_id] += 0.05
    return models


def _rollout(models, policy, compile, seed=0):
    ids, mask = tokenize_prompts(TOK, PROMPTS, 16)
    return generate(models.policy(policy), ids, mask, max_new_tokens=8, eos_token_id=TOK.eos_token_id,
                    pad_token_id=TOK.pad_token_id, temperature=1.3, generator=torch.Generator().manual_seed(seed),
                    compile=compile)


@pytest.mark.parametrize("variant, policy", [("hydra", "actor"), ("hydra", "reference"), ("lora", "actor"),
                                             ("full", "actor")])
def test_compiled_rollout_equals_eager(variant, policy):
    models = _models(variant)
    for seed in (0, 1):
        eager = _rollout(models, policy, compile=False, seed=seed)
        compiled = _rollout(models, policy, compile=True, seed=seed)
        for name in ("response_ids", "response_mask", "ended"):
            assert torch.equal(getattr(compiled, name), getattr(eager, name)), (seed, name)
        assert eager.ended.any() and not eager.ended.all()  # early stops and full-length rows both covered


def test_second_rollout_reuses_the_compiled_step():
    from torch._dynamo.utils import counters
    models = _models("hydra")
    _rollout(models, "actor", compile=True, seed=0)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    _rollout(models, "actor", compile=True, seed=1)
    assert counters["stats"]["unique_graphs"] == graphs


def test_compiled_rollout_sees_in_place_updates():
    """An optimizer step updates the adapters in place: the compiled step (one graph, reused) reads the new
    values, as the eager loop does."""
    models = _models("hydra")
    _rollout(models, "actor", compile=True)
    _randomize_adapters(models.model, seed=7)                  # in place, as AdamW would
    eager = _rollout(models, "actor", compile=False, seed=3)
    compiled = _rollout(models, "actor", compile=True, seed=3)
    assert torch.equal(compiled.response_ids, eager.response_ids)


def test_the_static_cache_does_not_keep_a_model_alive():
    import gc
    import weakref
    models = _models("hydra")
    _rollout(models, "actor", compile=True)
    ref = weakref.ref(models.model)
    del models
    torch._dynamo.reset()
    gc.collect()
    assert ref() is None


def test_ppo_steps_with_a_compiled_rollout(tmp_path):
    """PPOConfig.compile_rollout: the trainer pads every batch to the data's longest prompt (one shape), so the
    second step reuses the first one's compiled step; its rollout is the eager one at that padding."""
    from torch._dynamo.utils import counters

    from hydra_kernels.rlhf import ppo as ppo_mod
    from hydra_kernels.rlhf.config import load_config
    prompts = [f"{a}+{b}=" for a in (1, 22, 333) for b in (4, 55)]          # prompt lengths 4 to 8
    cfg = load_config(PPOConfig, None, ["variant=hydra", "batch_size=4", "mini_batch_size=2", "ppo_epochs=1",
                                        "max_new_tokens=5", "lora.r=4", "lora.alpha=8", "compile_rollout=true",
                                        "run.progress=false", f"run.output_dir={tmp_path}"])
    model = tiny_model(len(TOK))
    models = build_ppo_models(model, new_reward_head(model, torch.Generator().manual_seed(1)), cfg)
    trainer = ppo_mod.PPOTrainer(models, TOK, prompts, cfg)
    _, ro = trainer.rollout(0)
    assert ro.prompt_ids.shape[1] == max(map(len, trainer.prompt_tokens)) == 8    # BOS + the longest prompt
    again = generate(models.policy("actor"), ro.prompt_ids, ro.prompt_mask, max_new_tokens=5,
                     eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id,
                     generator=trainer_generator(trainer, 0))
    assert torch.equal(again.response_ids, ro.response_ids)
    trainer.step(0)
    graphs = counters["stats"]["unique_graphs"]
    history = trainer.step(1)
    assert counters["stats"]["unique_graphs"] == graphs
    assert all(torch.isfinite(torch.tensor(float(v))) for v in history.values() if isinstance(v, (int, float)))


def trainer_generator(trainer, step):
    from hydra_kernels.rlhf.run import row_generators
    return row_generators(trainer.cfg.run.seed, step, range(trainer.cfg.batch_size), trainer.device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_rollout_equals_eager(dtype):
    """On a GPU the compiled step runs as CUDA graphs (mode reduce-overhead) around the Triton LoRA kernels:
    greedy tokens equal the eager loop's in fp32. In bf16 Inductor's fused norms/rotary keep fp32 intermediates
    that eager rounds to bf16, so a near-tie of a random tiny model may flip: most tokens must agree."""
    models = _models("hydra")
    models.hydra.to(device="cuda", dtype=dtype)
    for layer in models.hydra.hydra_layers().values():      # fp32 master adapters, as on a real bf16 model
        layer.lora_A.data, layer.lora_B.data = layer.lora_A.data.float(), layer.lora_B.data.float()
    ids, mask = tokenize_prompts(TOK, PROMPTS, 16)
    kw = dict(max_new_tokens=12, eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id, temperature=0.0)
    eager = generate(models.policy("actor"), ids.cuda(), mask.cuda(), **kw)
    runs = [generate(models.policy("actor"), ids.cuda(), mask.cuda(), compile=True, **kw)
            for _ in range(3)]                              # warm-up, recording, replay
    for compiled in runs:
        assert torch.equal(compiled.response_ids, runs[0].response_ids)   # replays are deterministic
        agree = (compiled.response_ids == eager.response_ids).float().mean().item()
        assert agree == 1.0 if dtype == torch.float32 else agree >= 0.75, agree
