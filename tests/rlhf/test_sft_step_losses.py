"""Review: what one Hydra-SFT step computes, against a row-by-row re-derivation on unpadded sequences.

With lr 1e-12 the trained model and head equal the initial ones to ~1e-12, so the first (and only) step's
logged losses can be re-derived from the returned model: each sequence run alone (no padding), the reward
read at its last token (the EOS, or the last kept token when max_len cuts the response), the LM loss the
token mean of -log p over the response tokens and EOS of the demonstrations (+ the chosen responses when
lm_on_chosen), BT = mean -log sigmoid(r_chosen - r_rejected), reward accuracy = share with r_c > r_r.
Rows are left-padded in the step (prompts of different lengths), so this also checks the padding.
"""
import pytest
import torch
import torch.nn.functional as F

from hydra_kernels.rlhf.config import SFTConfig, load_config
from hydra_kernels.rlhf.data import PreferencePair, SFTExample
from hydra_kernels.rlhf.sft import hydra_sft
from tests.rlhf._tiny import CharTokenizer, tiny_model

TOK = CharTokenizer()
DEMOS = [SFTExample("1+1=", "2"), SFTExample("12+30=", "42"), SFTExample("3=", "3 3"), SFTExample("9+9+9=", "27")]
# The last chosen response is cut by max_len=12: 7 prompt tokens (BOS + 6) leave 5 of its 9 tokens (+ EOS).
PAIRS = [PreferencePair("2+2=", "4", "+"), PreferencePair("10+5=", "15", "= ="),
         PreferencePair("7=", "7", "77"), PreferencePair("0+0+0=", "0 0 0 0 0", "1")]


def _row(prompt, response, max_len=12):
    ids = [TOK.bos_token_id] + TOK.encode(prompt)
    n_prompt = len(ids)
    ids = (ids + TOK.encode(response) + [TOK.eos_token_id])[:max_len]
    return torch.tensor([ids]), n_prompt


def _derive(model, head, lm_on_chosen):
    def run(prompt, response):
        ids, n_prompt = _row(prompt, response)
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        logp = torch.log_softmax(out.logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        r = head(out.hidden_states[-1][0, -1].float()).item()
        return logp[n_prompt - 1:].sum().item(), len(logp) - (n_prompt - 1), r
    lp, n = 0.0, 0
    for e in DEMOS:
        s, k, _ = run(e.prompt, e.completion)
        lp, n = lp + s, n + k
    rc, rr = [], []
    for p in PAIRS:
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
    res = hydra_sft(tiny_model(len(TOK)), TOK, DEMOS, PAIRS, cfg, eval_pairs=PAIRS[:2])
    want, n_tokens = _derive(res.model, res.reward_head, lm_on_chosen)
    # token count: demos 2+3+4+3, chosen 2+3+2+5 (the cut one has no EOS)
    assert n_tokens == (12 + 12 if lm_on_chosen else 12)
    got = res.history[0]
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
