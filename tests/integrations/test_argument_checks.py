"""patch_model / HydraModel.from_pretrained_base refuse LoRA settings that mean something else than they seem
("actor" as adapters, r=True, alpha nan / negative / str); forward_streams / decoder_forward refuse float
input_ids and token ids outside the embedding; a tokenizer larger than the model's embedding is refused
(check_tokenizer_fits, HydraModel(tokenizer=...)) before anything runs. Each ValueError names the argument."""
import pytest
import torch

from hydra_kernels.integrations import HydraModel, check_tokenizer_fits, decoder_forward, patch_model

from tests.integrations._models import ALPHA, R, VOCAB, batch, make_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize("kw, name", [
    ({"adapters": "actor"}, "adapters"),
    ({"adapters": ("actor", "base")}, "adapters"),
    ({"r": True}, "r"),
    ({"r": 2.0}, "r"),
    ({"alpha": float("nan")}, "alpha"),
    ({"alpha": -8}, "alpha"),
    ({"alpha": "8"}, "alpha"),
    ({"alpha": float("inf")}, "alpha"),
])
@pytest.mark.parametrize("how", ["patch_model", "from_pretrained_base"])
def test_lora_footguns_are_refused_and_nothing_is_patched(kw, name, how):
    model = make_model("llama")
    args = {"adapters": ("actor",), "r": R, "alpha": ALPHA, **kw}
    with pytest.raises(ValueError, match=rf"^{name}:"):
        if how == "patch_model":
            patch_model(model, **args)
        else:
            HydraModel.from_pretrained_base(model, **args)
    assert not hasattr(model, "hydra_patch")
    assert all(type(m).__name__ != "HydraLinear" for m in model.modules())


@pytest.fixture(scope="module")
def hydra():
    return HydraModel.from_pretrained_base(make_model("llama"), r=R, alpha=ALPHA)


@pytest.mark.parametrize("bad, match", [
    (lambda ids: ids.float(), r"input_ids: dtype torch.float32; token ids must be int64 or int32"),
    (lambda ids: ids.masked_fill(ids == ids[0, -1], VOCAB), rf"input_ids: token id {VOCAB} is outside the model's "
                                                            rf"vocabulary \[0, {VOCAB}\)"),
    (lambda ids: ids.masked_fill(ids == ids[0, -1], -1), r"input_ids: token id -1 is outside"),
])
def test_bad_token_ids_are_refused(hydra, bad, match):
    ids, mask = batch()
    with pytest.raises(ValueError, match=match):
        hydra.forward_streams(bad(ids), mask)
    with pytest.raises(ValueError, match=match):
        decoder_forward(hydra.model, bad(ids), mask, streams=("base",))
    assert hydra.forward_streams(ids.int(), mask).shape[:2] == (3, ids.shape[0])    # int32 ids are fine


class _Tokenizer:
    """What check_tokenizer_fits reads of a tokenizer: its length and special token ids."""

    def __init__(self, size, pad=0):
        self.size, self.pad_token_id, self.eos_token_id = size, pad, 2

    def __len__(self):
        return self.size


def test_a_tokenizer_larger_than_the_embedding_is_refused():
    model = make_model("llama")
    check_tokenizer_fits(_Tokenizer(VOCAB), model)
    with pytest.raises(ValueError, match=rf"tokenizer: its vocabulary has {VOCAB + 1} tokens, the model's input "
                                         rf"embedding only {VOCAB} rows"):
        check_tokenizer_fits(_Tokenizer(VOCAB + 1), model)
    with pytest.raises(ValueError, match=rf"tokenizer: pad_token_id={VOCAB} is out of range"):
        check_tokenizer_fits(_Tokenizer(VOCAB, pad=VOCAB), model)
    with pytest.raises(ValueError, match=r"^tokenizer: its vocabulary has"):
        HydraModel.from_pretrained_base(model, r=R, alpha=ALPHA, tokenizer=_Tokenizer(VOCAB + 5))


def test_a_real_tokenizer_whose_pad_was_added_without_resizing_is_refused():
    from hydra_kernels.rlhf.demo.tokenizer import build_char_tokenizer
    tok = build_char_tokenizer()
    model = make_model("llama")
    model.resize_token_embeddings(len(tok))
    check_tokenizer_fits(tok, model)
    tok.add_special_tokens({"pad_token": "<|extra-pad|>"})          # a new id, one past the embedding
    with pytest.raises(ValueError, match=r"^tokenizer: its vocabulary has"):
        check_tokenizer_fits(tok, model)
