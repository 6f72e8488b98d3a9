"""Hydra-SFT's preference batches: a pair that truncation makes identical is reported, not trained on silently."""
import warnings

import pytest

from hydra_kernels.rlhf.config import SFTConfig, load_config
from hydra_kernels.rlhf.data import PreferencePair
from hydra_kernels.rlhf.sft import _pair_batch
from tests.rlhf._tiny import CharTokenizer


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
    import torch

    import hydra_kernels.rlhf.sft as sft
    from tests.rlhf._tiny import tiny_model
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
