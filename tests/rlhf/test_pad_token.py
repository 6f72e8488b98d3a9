"""A tokenizer without a distinct pad token gets one (add_pad_token): the embedding rows it adds are the same on
every load (the mean of the others), so identically seeded runs agree and a resumed Hydra-SFT run is not refused;
a resume refused for other model weights names the parameters that differ."""
import pytest
import torch

from hydra_kernels.rlhf.checkpoint import check_resume_inputs, inputs_digest
from hydra_kernels.rlhf.config import SFTConfig, load_config
from hydra_kernels.rlhf.data import SFTExample, add_pad_token
from hydra_kernels.rlhf.demo.model import TinyModelConfig, build_tiny_model
from hydra_kernels.rlhf.demo.tokenizer import build_char_tokenizer
import hydra_kernels.rlhf.run as run_module
from hydra_kernels.rlhf.sft import hydra_sft

DEMOS = [SFTExample(f"{a}+{b}=", str(a + b)) for a in range(4) for b in range(4)]


def _model_and_tokenizer(global_seed: int):
    """The demo's char tokenizer with pad == eos (as many pretrained tokenizers ship) and a tiny model; the
    global RNG in some other state each time, as in two processes."""
    tok = build_char_tokenizer()
    tok.pad_token = tok.eos_token
    model = build_tiny_model(tok, TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                                                  max_positions=64), seed=0)
    torch.manual_seed(global_seed)
    add_pad_token(tok, model)
    return model, tok


def test_the_added_rows_are_the_mean_embedding_on_every_load():
    (a, tok), (b, _) = _model_and_tokenizer(1), _model_and_tokenizer(2)
    n = len(tok)
    for model in (a, b):
        for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            assert w.shape[0] == n
            assert torch.equal(w[-1], w[:-1].float().mean(0).to(w.dtype))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert tok.pad_token_id == n - 1 != tok.eos_token_id


def test_a_resumed_sft_run_with_an_added_pad_token_is_not_refused(tmp_path, monkeypatch):
    cfg = load_config(SFTConfig, None, ["epochs=2", "batch_size=8", "run.progress=false", "run.checkpoint_every=1",
                                        f"run.output_dir={tmp_path}", "data.max_prompt_len=8", "data.max_len=12"])
    real = run_module.save_checkpoint

    def killing(root, step, *a, **k):
        path = real(root, step, *a, **k)
        raise KeyboardInterrupt("killed")
    monkeypatch.setattr(run_module, "save_checkpoint", killing)
    with pytest.raises(KeyboardInterrupt):
        hydra_sft(*_model_and_tokenizer(1), DEMOS, [], cfg)
    monkeypatch.undo()
    model, tok = _model_and_tokenizer(2)                  # another process: the pad row loaded again
    res = hydra_sft(model, tok, DEMOS, [], cfg)
    assert [r["epoch"] for r in res.history] == [1, 2]


def test_a_refused_resume_names_the_parameters_that_differ(tmp_path):
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    with torch.no_grad():
        b.weight.copy_(a.weight)
        b.bias.copy_(a.bias + 1)
    saved = inputs_digest(modules={"model.path": a}, data={"data.sft_path": ["x"]})
    with pytest.raises(ValueError, match=r"other inputs \(model.path: other contents \(parameters bias differ\)\)"):
        check_resume_inputs(saved, inputs_digest(modules={"model.path": b}, data={"data.sft_path": ["x"]}), tmp_path)
    check_resume_inputs(saved, inputs_digest(modules={"model.path": a}, data={"data.sft_path": ["x"]}), tmp_path)
    # A checkpoint of an older version stores only the module's digest: the setting is named, without detail.
    old = {k: v for k, v in saved.items() if "/" not in k}
    with pytest.raises(ValueError, match=r"other inputs \(model.path: other contents\)\. "):
        check_resume_inputs(old, inputs_digest(modules={"model.path": b}), tmp_path)
