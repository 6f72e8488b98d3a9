"""Hydra-SFT training (rlhf.sft): full and LoRA-merged runs and their saved result, the LM loss and its mask,
one step's losses against a row-by-row derivation, preference batches, the eval split, and the step records."""
import json
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import hydra_kernels.rlhf.run as run_module
from hydra_kernels.nn import HydraLinear
from hydra_kernels.rlhf.config import SFTConfig, load_config
from hydra_kernels.rlhf.data import PreferencePair, SFTExample
from hydra_kernels.rlhf.sft import (_demo_batch, _forward, _lm_logprob_sum, _pair_batch, _split_eval,
                                    evaluate_demonstrations, evaluate_pairs, hydra_sft, load_sft)
from tests.rlhf._tiny import CharTokenizer, tiny_model

TOK = CharTokenizer()
RNG = random.Random(0)
DEMOS = [SFTExample(f"{a}+{b}=", str(a + b)) for a in range(8) for b in range(5)]
# Chosen answers are numbers, rejected ones are not: separable within a few dozen steps.
PAIRS = [PreferencePair(f"{a}+{b}=", str(a + b), RNG.choice(["+", "==", " +", "+="])) for a in range(8) for b in range(8)]


def _cfg(tmp_path, mode, *extra):
    return load_config(SFTConfig, None, [f"mode={mode}", "epochs=3", "batch_size=8", "lr=0.01", "lora.r=4",
                                         "lora.alpha=8", "run.progress=false", f"run.output_dir={tmp_path}",
                                         "data.eval_fraction=0.25", *extra])


def test_full_sft_learns_lm_and_reward_and_saves(tmp_path):
    model = tiny_model(len(TOK))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = hydra_sft(model, TOK, DEMOS, PAIRS, _cfg(tmp_path, "full"))
    h = res.history
    assert h[-1]["train/lm_loss"] < h[0]["train/lm_loss"]
    assert res.metrics["eval/reward_accuracy"] >= 0.9 and res.metrics["eval/reward_margin"] > 0
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    loaded, head = load_sft(res.output_dir)
    sd = model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in loaded.state_dict().items())
    assert torch.equal(head.weight, res.reward_head.weight) and torch.equal(head.bias, res.reward_head.bias)
    again = evaluate_pairs(loaded, head, TOK, PAIRS[:16], _cfg(tmp_path, "full"))
    ref = evaluate_pairs(model, res.reward_head, TOK, PAIRS[:16], _cfg(tmp_path, "full"))
    assert again == pytest.approx(ref, rel=1e-5)


def test_lora_sft_is_merged_into_the_base(tmp_path):
    model = tiny_model(len(TOK))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = _cfg(tmp_path, "lora", "epochs=1")
    seen = {}
    eval_pairs = PAIRS[:12]
    # The callback's evaluation runs with the adapter switched on, before the merge.
    res = hydra_sft(model, TOK, DEMOS, PAIRS[12:], cfg, eval_pairs=eval_pairs,
                    callback=lambda e, m: seen.update(m))
    assert not any(isinstance(m, HydraLinear) for m in model.modules())
    assert set(model.state_dict()) == set(before)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed)      # only the adapted projections
    after = evaluate_pairs(model, res.reward_head, TOK, eval_pairs, cfg)
    assert after["lm_loss"] == pytest.approx(seen["eval/lm_loss"], abs=1e-4)
    assert after["reward_margin"] == pytest.approx(seen["eval/reward_margin"], abs=1e-4)


def test_failed_sft_saves_nothing(tmp_path):
    def boom(epoch, metrics):
        raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError, match="interrupted"):
        hydra_sft(tiny_model(len(TOK)), TOK, DEMOS[:8], PAIRS[:8], _cfg(tmp_path, "full", "epochs=1"), callback=boom)
    assert not (tmp_path / "final").exists()
    with pytest.raises(ValueError, match="demonstrations"):
        hydra_sft(tiny_model(len(TOK)), TOK, [], [], _cfg(tmp_path, "full"))


# ------------------------------------------------------------------------------------------------ LM loss
def test_lm_loss_counts_response_tokens_only():
    model = tiny_model(len(TOK))
    cfg = SFTConfig()
    batch = _demo_batch(TOK, DEMOS[:3], cfg)
    with torch.no_grad():
        lp, n = _lm_logprob_sum(model, _forward(model, batch), batch)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids).logits.float()
    assert n == sum(len(e.completion) + 1 for e in DEMOS[:3])        # completion characters + EOS
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    assert lp.item() == pytest.approx(float((logp * batch.loss_mask[:, 1:]).sum()), rel=1e-5)


# With a tokenizer that has no BOS (GPT-2 style bos == eos, Qwen2: bos None) an empty prompt's first completion
# token has no real token before it; left-padded, the loss must not predict it from the pad position.
class NoBosTokenizer(CharTokenizer):
    bos_token_id = None


def _lp(model, tok, examples):
    batch = _demo_batch(tok, examples, SFTConfig())
    with torch.no_grad():
        lp, n = _lm_logprob_sum(model, _forward(model, batch), batch)
    return float(lp), n


def test_empty_prompt_without_bos_is_not_trained_from_padding():
    tok = NoBosTokenizer()
    model = tiny_model(len(tok))
    empty, other = SFTExample("", "12"), SFTExample("1+1=", "2")
    lp_e, n_e = _lp(model, tok, [empty])
    lp_o, n_o = _lp(model, tok, [other])
    # Alone, the empty-prompt row has no position before its first token: '2' and EOS are predicted.
    assert (n_e, n_o) == (2, 2)
    lp_b, n_b = _lp(model, tok, [empty, other])        # `empty` is left-padded by 3
    assert n_b == n_e + n_o
    assert lp_b == pytest.approx(lp_e + lp_o, rel=1e-5, abs=1e-5)


# ------------------------------------------------------------------------------------- one step's losses
# With lr 1e-12 the returned model and head are the initial ones to ~1e-12, so the first step's logged losses
# can be re-derived from them, each sequence run alone (unpadded); the step left-pads prompts of different
# lengths. max_len=12 cuts the last chosen response: 7 prompt tokens (BOS + 6) leave 5 of its 9 (+ EOS).
STEP_DEMOS = [SFTExample("1+1=", "2"), SFTExample("12+30=", "42"), SFTExample("3=", "3 3"),
              SFTExample("9+9+9=", "27")]
STEP_PAIRS = [PreferencePair("2+2=", "4", "+"), PreferencePair("10+5=", "15", "= ="),
              PreferencePair("7=", "7", "77"), PreferencePair("0+0+0=", "0 0 0 0 0", "1")]


def _row(prompt, response, max_len=12):
    ids = [TOK.bos_token_id] + TOK.encode(prompt)
    n_prompt = len(ids)
    ids = (ids + TOK.encode(response) + [TOK.eos_token_id])[:max_len]
    return torch.tensor([ids]), n_prompt


def _derive(model, head, lm_on_chosen):
    """The LM loss (token mean of -log p over the demonstrations' response tokens and EOS, + the chosen
    responses' when lm_on_chosen), BT loss and reward accuracy, the reward read at each row's last token."""
    def run(prompt, response):
        ids, n_prompt = _row(prompt, response)
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        logp = torch.log_softmax(out.logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        r = head(out.hidden_states[-1][0, -1].float()).item()
        return logp[n_prompt - 1:].sum().item(), len(logp) - (n_prompt - 1), r
    lp, n = 0.0, 0
    for e in STEP_DEMOS:
        s, k, _ = run(e.prompt, e.completion)
        lp, n = lp + s, n + k
    rc, rr = [], []
    for p in STEP_PAIRS:
        s, k, r_c = run(p.prompt, p.chosen)
        if lm_on_chosen:
            lp, n = lp + s, n + k
        rc.append(r_c)
        rr.append(run(p.prompt, p.rejected)[2])
    d = torch.tensor(rc, dtype=torch.float64) - torch.tensor(rr, dtype=torch.float64)
    return {"train/lm_loss": -lp / n, "train/bt_loss": float(-F.logsigmoid(d).mean()),
            "train/reward_accuracy": float((d > 0).double().mean())}, n


@pytest.mark.parametrize("lm_on_chosen", [True, False])
def test_first_step_losses_match_a_row_by_row_derivation(tmp_path, lm_on_chosen):
    cfg = load_config(SFTConfig, None, ["epochs=1", "batch_size=4", "lr=1e-12", "reward_coef=3",
                                        f"lm_on_chosen={str(lm_on_chosen).lower()}", "data.max_prompt_len=8",
                                        "data.max_len=12", "run.progress=false", "run.checkpoint_minutes=0",
                                        f"run.output_dir={tmp_path}"])
    res = hydra_sft(tiny_model(len(TOK)), TOK, STEP_DEMOS, STEP_PAIRS, cfg, eval_pairs=STEP_PAIRS[:2])
    want, n_tokens = _derive(res.model, res.reward_head, lm_on_chosen)
    # token count: demos 2+3+4+3, chosen 2+3+2+5 (the cut one has no EOS)
    assert n_tokens == (12 + 12 if lm_on_chosen else 12)
    got = res.history[0]
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


# ------------------------------------------------------------------------------------- preference batches
def test_pairs_identical_after_truncation_warn():
    tok = CharTokenizer()
    cfg = load_config(SFTConfig, None, ["data.max_prompt_len=4", "data.max_len=8"])
    same_prefix = PreferencePair("1+2=", "3333333", "3333339")       # differ only beyond max_len
    fine = PreferencePair("1+2=", "3", "4")
    with pytest.warns(RuntimeWarning, match=r"1 of 2 preference pairs .* identical after truncation .*max_len=8"):
        batch = _pair_batch(tok, [same_prefix, fine], cfg)
    assert batch.input_ids.shape[0] == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _pair_batch(tok, [fine], cfg)


def test_reward_accuracy_counts_equal_scores_and_identical_pairs_as_wrong(monkeypatch):
    import hydra_kernels.rlhf.sft as sft
    tok = CharTokenizer()
    cfg = SFTConfig()
    pairs = [PreferencePair("1+2=", "3", "3"),          # identical: its scores differ by float noise only
             PreferencePair("1+2=", "3", "4"),          # a tie
             PreferencePair("1+2=", "3", "5")]          # a real win
    # chosen rows, then rejected rows: the identical pair's chosen row ahead by noise, the tie exactly equal.
    monkeypatch.setattr(sft, "_rewards", lambda head, h: torch.tensor([1.0 + 1e-6, 0.5, 2.0, 1.0, 0.5, -1.0]))
    model = tiny_model(len(tok))
    head = torch.nn.Linear(32, 1)
    with pytest.warns(RuntimeWarning, match="identical after truncation"):
        out = sft.evaluate_pairs(model, head, tok, pairs, cfg)
    assert out["reward_accuracy"] == pytest.approx(1 / 3)
    with pytest.warns(RuntimeWarning):
        batch = _pair_batch(tok, pairs, cfg)
    assert sft._wins(torch.tensor([1.0 + 1e-6, 0.5, 2.0, 1.0, 0.5, -1.0]), batch).tolist() == [False, False, True]


# ----------------------------------------------------------------------------- data.eval_fraction's split
# Deterministic in run.seed, a partition, and at least one pair left to train on (round(0.75 * 2) is 2).
def test_split_is_a_deterministic_partition_that_keeps_a_training_pair():
    items = list(range(10))
    train, ev = _split_eval(items, 0.3, seed=4)
    assert len(ev) == 3 and sorted(train + ev) == items
    assert (train, ev) == _split_eval(items, 0.3, seed=4)
    assert _split_eval(items, 0.3, seed=5) != (train, ev)
    for n, fraction in ((2, 0.75), (3, 0.9), (4, 0.95)):
        train, ev = _split_eval(list(range(n)), fraction, seed=0)
        assert len(train) >= 1 and len(ev) >= 1 and sorted(train + ev) == list(range(n)), (n, fraction)


def test_pairs_only_with_a_large_eval_fraction_still_trains(tmp_path):
    tok = CharTokenizer()
    pairs = [PreferencePair("1+1=", "2", "+"), PreferencePair("2+2=", "4", "==")]
    cfg = load_config(SFTConfig, None, ["epochs=1", "batch_size=2", "data.eval_fraction=0.75", "run.progress=false",
                                        "run.checkpoint_minutes=0", f"run.output_dir={tmp_path}"])
    model = tiny_model(len(tok))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = hydra_sft(model, tok, [], pairs, cfg)
    assert len(res.history) == 1 and "eval/reward_accuracy" in res.history[0]
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------- records every logging_steps / eval_steps
LOG_DEMOS = [SFTExample(f"{a}+{b}=", str(a + b)) for a in range(4) for b in range(4)]        # 16
LOG_PAIRS = [PreferencePair(f"{a}+{b}=", str(a + b), "+") for a in range(4) for b in range(3)]   # 12


def _log_cfg(out, *extra):
    return load_config(SFTConfig, None, ["batch_size=4", "lr=0.01", "epochs=2", "data.eval_fraction=0.25",
                                         "data.sft_eval_fraction=0.25", "logging_steps=2", "eval_steps=3",
                                         "run.progress=false", "run.checkpoint_minutes=0",
                                         f"run.output_dir={out}", *extra])


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_records_every_logging_and_eval_steps_and_held_out_demonstrations(tmp_path):
    res = hydra_sft(tiny_model(len(TOK)), TOK, LOG_DEMOS, LOG_PAIRS, _log_cfg(tmp_path))
    rows = _lines(tmp_path / "metrics.jsonl")
    assert rows == res.history
    # 12 demonstrations and 9 pairs train: 3 steps per epoch, 6 in all. Logging records at steps 2, 4 and 6;
    # eval_steps=3 falls on the epochs' ends, whose records (epoch: an int) carry the evaluation.
    epochs = [r for r in rows if isinstance(r["epoch"], int)]
    assert [r["step"] for r in epochs] == [3, 6]
    assert all({"eval/reward_accuracy", "train/lm_loss"} <= r.keys() for r in epochs)
    logged = [r for r in rows if r not in epochs]
    assert [r["step"] for r in logged] == [2, 4, 6]
    for r in logged:
        assert {"lr", "train/lm_loss", "train/bt_loss", "train/reward_accuracy"} <= r.keys()
        assert r["epoch"] == pytest.approx(r["step"] / 3, abs=1e-4)
    for r in epochs:
        assert r["eval/demo_lm_loss"] > 0 and r["lr"] == pytest.approx(0.01)
    assert res.metrics["eval/demo_lm_loss"] == epochs[-1]["eval/demo_lm_loss"]


def test_eval_steps_inside_an_epoch_and_the_held_out_loss_is_that_of_the_held_out_demos(tmp_path):
    model = tiny_model(len(TOK))
    held = LOG_DEMOS[:4]
    res = hydra_sft(model, TOK, LOG_DEMOS[4:], LOG_PAIRS,
                    _log_cfg(tmp_path, "logging_steps=0", "eval_steps=2", "epochs=1"), eval_demonstrations=held)
    mid = [r for r in res.history if r["step"] == 2]
    assert len(mid) == 1 and set(mid[0]) == {"step", "epoch", "eval/lm_loss", "eval/reward_accuracy",
                                             "eval/reward_margin", "eval/demo_lm_loss", "world_size"}
    want = evaluate_demonstrations(res.model, TOK, held, _log_cfg(tmp_path))["lm_loss"]
    assert res.metrics["eval/demo_lm_loss"] == pytest.approx(want, rel=1e-5)


def test_resumed_run_with_step_records_is_bitwise_the_same(tmp_path):
    straight = tmp_path / "straight"
    hydra_sft(tiny_model(len(TOK)), TOK, LOG_DEMOS, LOG_PAIRS, _log_cfg(straight))
    run = tmp_path / "run"
    real = run_module.save_checkpoint

    def killing(root, step, *a, **k):
        path = real(root, step, *a, **k)
        if step == 5:                    # after the logging record of step 4, inside a logging window
            raise KeyboardInterrupt("killed")
        return path
    run_module.save_checkpoint = killing
    try:
        with pytest.raises(KeyboardInterrupt):
            hydra_sft(tiny_model(len(TOK)), TOK, LOG_DEMOS, LOG_PAIRS, _log_cfg(run, "run.checkpoint_every=1"))
    finally:
        run_module.save_checkpoint = real
    hydra_sft(tiny_model(len(TOK)), TOK, LOG_DEMOS, LOG_PAIRS, _log_cfg(run, "run.checkpoint_every=1"))
    assert _lines(run / "metrics.jsonl") == _lines(straight / "metrics.jsonl")
    for name in ("model.safetensors", "reward_head.safetensors"):
        a, b = load_file(str(run / "final" / name)), load_file(str(straight / "final" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
