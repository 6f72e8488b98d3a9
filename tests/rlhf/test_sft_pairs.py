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
