"""The patched model on a GPU in bf16 against peft: the Triton LoRA kernels inside a whole Llama.

Through the actor stream (a peft adapter loaded into it), logits and the adapter's gradients are as close to the
float64 peft model as peft's own bf16 model is; the base stream is as close to the plain model as the plain bf16
model is; in one three-stream forward the critic stream (B = 0) equals the base stream bit for bit. Marked gpu
(skipped without a CUDA device); one small random Llama built from a config (nothing is downloaded).
"""
import copy

import pytest
import torch

import hydra_kernels as hk
from hydra_kernels.integrations import HydraModel, hydra_modules, position_ids_from_attention_mask

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::UserWarning")]

DEV = "cuda"
R, ALPHA = 16, 32
VOCAB = 2048
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# ours may be this much less accurate than peft's bf16 model, relative to float64 (bf16 rounds differently in
# fused and unfused code; neither is exact), plus a floor for near-equal errors.
SLACK, FLOOR = 1.25, 1e-3


def _base():
    import transformers as T
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=512, intermediate_size=1376, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return T.LlamaForCausalLM(cfg).eval()


def _batch():
    """Left-padded ids and mask, rows of different lengths."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (4, 96), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    mask[3, :40] = 0
    return ids.masked_fill(mask == 0, 0).to(DEV), mask.to(DEV)


def _logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_attention_mask(mask)).logits


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(float64 peft model, bf16 peft model, bf16 HydraModel with the same adapter as `actor`, bf16 plain model)."""
    from peft import LoraConfig, get_peft_model
    base = _base()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS,
                                                                     init_lora_weights=False)).eval()
    path = tmp_path_factory.mktemp("peft")
    peft_model.save_pretrained(path)
    ref = copy.deepcopy(peft_model).double().to(DEV)
    peft_bf16 = copy.deepcopy(peft_model).to(torch.bfloat16).to(DEV)
    h = HydraModel.from_pretrained_base(copy.deepcopy(base).to(torch.bfloat16).to(DEV), adapters=("actor", "critic"),
                                        r=R, alpha=ALPHA).eval()
    h.load_peft("actor", path)
    return ref, peft_bf16, h, copy.deepcopy(base).to(torch.bfloat16).to(DEV)


def test_actor_logits_as_accurate_as_peft_bf16(models):
    ref, peft_bf16, h, _ = models
    ids, mask = _batch()
    real = mask.bool()
    with torch.no_grad():
        want = _logits(ref, ids, mask)[real]
        theirs = _logits(peft_bf16, ids, mask)[real]
        with hk.streams(h.model, "actor"):
            ours = _logits(h.model, ids, mask)[real]
    assert torch.isfinite(ours).all()
    e_ours, e_peft = _rel(ours, want), _rel(theirs, want)
    assert e_ours <= SLACK * e_peft + FLOOR, (e_ours, e_peft)


def test_base_stream_as_accurate_as_the_plain_bf16_model(models):
    ref, _, h, plain = models
    ids, mask = _batch()
    real = mask.bool()
    with torch.no_grad():
        with ref.disable_adapter():
            want = _logits(ref, ids, mask)[real]
        theirs = _logits(plain, ids, mask)[real]
        with hk.streams(h.model, "base"):
            ours = _logits(h.model, ids, mask)[real]
    e_ours, e_plain = _rel(ours, want), _rel(theirs, want)
    assert e_ours <= SLACK * e_plain + FLOOR, (e_ours, e_plain)


def test_three_streams_in_one_forward(models):
    """base, actor, critic in one forward: critic (lora_B = 0) is the base bit for bit; actor matches its own
    single-stream forward at bf16 resolution (other row counts may autotune to other tiles)."""
    _, _, h, _ = models
    ids, mask = _batch()
    with torch.no_grad():
        three = h.forward_streams(ids, mask, streams=("base", "actor", "critic"))
        actor = h.forward_streams(ids, mask, streams=("actor",))
    assert torch.equal(three[2], three[0])
    real = mask.bool()
    assert _rel(three[1][real], actor[0][real]) < 1e-2
    assert _rel(three[1][real], three[0][real]) > 1e-3                 # the adapter does something


def _loss(logits, ids, mask):
    """A PPO-like loss: per-token weights that differ, so a backward that scales a forward-time gradient by one
    scalar would be wrong."""
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    w = torch.linspace(0.5, 2.0, logp.shape[1], device=logp.device)
    return -(logp * w * mask[:, 1:]).sum()


def _peft_grads(model, paths):
    inner = model.base_model.model
    out = []
    for p in paths:
        m = inner.get_submodule(p)
        out += [m.lora_A["default"].weight.grad, m.lora_B["default"].weight.grad]
    return torch.cat([g.double().flatten() for g in out])


def test_actor_lora_gradients_as_accurate_as_peft_bf16(models):
    ref, peft_bf16, h, _ = models
    ids, mask = _batch()
    layers = hydra_modules(h.model)
    paths = sorted(layers)
    for m in (ref, peft_bf16):
        m.zero_grad(set_to_none=True)
        _loss(_logits(m, ids, mask), ids, mask).backward()
    h.zero_grad(set_to_none=True)
    with hk.streams(h.model, "actor"):
        _loss(_logits(h.model, ids, mask), ids, mask).backward()
    ours = []
    for p in paths:
        layer = layers[p]
        i = layer.adapters.index("actor")
        ours += [layer.lora_A.grad[i], layer.lora_B.grad[i]]
    ours = torch.cat([g.double().flatten() for g in ours])
    want, theirs = _peft_grads(ref, paths), _peft_grads(peft_bf16, paths)
    assert torch.isfinite(ours).all() and want.norm() > 0
    e_ours, e_peft = _rel(ours, want), _rel(theirs, want)
    assert e_ours <= SLACK * e_peft + FLOOR, (e_ours, e_peft)
