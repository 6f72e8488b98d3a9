"""Review: data.eval_fraction's hold-out split of the preference pairs.

The split must be deterministic in run.seed, a partition of the pairs, and must leave at least one pair to
train on: eval_fraction < 1 is allowed, but round(fraction * n) can be n for few pairs (0.75 * 2 -> 2), which
held out every pair: the reward head then trained on nothing (with demonstrations), or, with pairs only,
steps_per_epoch was 0 and hydra_sft died with ZeroDivisionError.
"""
import torch

from hydra_kernels.rlhf.config import SFTConfig, load_config
from hydra_kernels.rlhf.data import PreferencePair
from hydra_kernels.rlhf.sft import _split_eval, hydra_sft
from tests.rlhf._tiny import CharTokenizer, tiny_model


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
