"""The reward-source layer (rlhf.rewards), shared by PPO and GRPO: what a reward function may return, how it is
called (PPO's positional signature, TRL's keywords, named parameters), weighted functions, a reward model
directory, and PPO driven through it."""
import math
import traceback

import numpy as np
import pytest
import torch

from hydra_kernels.rlhf.rewards import (RewardInputs, RewardModel, Rewards, build_rewards, call_reward_fn,
                                        raised_by_reward_fn, reward_values)
from tests.rlhf._ppo_job import digit_reward, run as run_ppo

INPUTS = RewardInputs(["1+1=", "2+2="], ["2", "5"], [[5, 1], [8]], [True, False], {"answer": ["2", "4"]})


def ppo_style(prompts, completions, ended):
    return [1.0 if e else -1.0 for e in ended]


@pytest.mark.parametrize("returned, needle", [
    ({"a": 1.0, "b": 2.0}, "dict"), ("12", "str"), (None, "NoneType"), ([[1.0], [2.0]], "element 0 is list"),
    ([1 + 2j, 0.0], "element 0 is complex"), ([True, False], "element 0 is bool"), ([1.0], "1 values for 2"),
    ([1.0, float("inf")], "infinite"), ([1.0, None], "element 1 is NoneType"), ([1.0, "2"], "element 1 is str"),
    (torch.tensor([1 + 1j, 2j]), "complex"), (torch.ones(2, 1), "shape"), (np.array(["a", "b"]), "dtype"),
    (np.array([1 + 1j, 0]), "dtype"), (torch.tensor([True, False]), "torch.bool"), (3.0, "float"),
    (iter([1.0, 2.0]), "list_iterator")])
def test_bad_returns_raise_naming_reward_fn_and_what_came_back(returned, needle):
    def my_reward(prompts, completions, ended):
        return returned

    with pytest.raises(ValueError, match=r"^reward_fn: my_reward returned .*") as e:
        call_reward_fn(my_reward, INPUTS)
    assert needle in str(e.value)


@pytest.mark.parametrize("returned", [[1, 2.5], (1.0, 2.0), torch.tensor([1.0, 2.0]), np.array([1.0, 2.0]),
                                      np.array([1, 2], dtype=np.int32), [np.float32(1.0), torch.tensor(2.0)],
                                      [float("nan"), 2.0]])
def test_good_returns_are_accepted(returned):
    out = call_reward_fn(lambda p, c, e: returned, INPUTS)
    assert out.dtype == torch.float64 and out.shape == (2,) and out[1].item() in (2.0, 2.5)


def test_an_exception_in_the_users_function_propagates_unchanged():
    class Mine(Exception):
        pass

    err = Mine("inside")

    def broken(prompts, completions, **kwargs):
        raise err

    with pytest.raises(Mine) as e:
        call_reward_fn(broken, INPUTS)
    assert e.value is err and raised_by_reward_fn(e.value)
    assert "broken" in "".join(traceback.format_tb(e.value.__traceback__))     # its own frame is in the traceback
    assert not raised_by_reward_fn(ValueError("reward_fn: a setting"))
    with pytest.raises(KeyError):
        call_reward_fn(lambda p, c, e: {}["x"], INPUTS)


def test_the_three_call_styles():
    seen = {}

    def trl(prompts, completions, **kwargs):                  # TRL: keywords, the columns among them
        seen["trl"] = (prompts, completions, kwargs)
        return [0.0, 0.0]

    def named(completions, answer):                           # TRL without **kwargs: only what it names
        seen["named"] = (completions, answer)
        return [float(c == a) for c, a in zip(completions, answer)]

    def ppo(ps, cs, ended):                                   # PPO: three positional arguments, any names
        seen["ppo"] = (ps, cs, ended)
        return [0.0, 1.0]

    call_reward_fn(trl, INPUTS)
    assert seen["trl"][2] == {"completion_ids": [[5, 1], [8]], "ended": [True, False], "answer": ["2", "4"]}
    assert call_reward_fn(named, INPUTS).tolist() == [1.0, 0.0] and seen["named"] == (["2", "5"], ["2", "4"])
    call_reward_fn(ppo, INPUTS)
    assert seen["ppo"] == (["1+1=", "2+2="], ["2", "5"], [True, False])

    def wants_more(completions, solution):
        return [0.0, 0.0]

    with pytest.raises(ValueError, match="^reward_fn: wants_more takes .*solution"):
        call_reward_fn(wants_more, INPUTS)


def test_weighted_functions_sum_as_trl_and_skip_nan():
    def a(prompts, completions, ended):
        return [1.0, float("nan")]

    def b(prompts, completions, **kw):
        return [2.0, float("nan")]

    def c(prompts, completions, **kw):
        return [4.0, 3.0]

    total, per = Rewards("function", [a, b], [1.0, 0.5])(INPUTS, torch.device("cpu"))
    assert total[0].item() == 2.0 and math.isnan(total[1].item())          # every function NaN: the row is NaN
    assert set(per) == {"a", "b"} and per["b"][0].item() == 2.0
    total, _ = Rewards("function", [a, c], [1.0, -1.0])(INPUTS, torch.device("cpu"))
    assert total.tolist() == [-3.0, -3.0]                                   # NaN skipped (TRL's nansum)
    total, per = Rewards("function", [c, c])(INPUTS, torch.device("cpu"))
    assert total.tolist() == [8.0, 6.0] and set(per) == {"c_0", "c_1"}
    with pytest.raises(ValueError, match="^reward_weights: 1 weights for 2"):
        Rewards("function", [a, b], [1.0])
    with pytest.raises(ValueError, match="^reward_fn"):
        build_rewards("head", a)
    with pytest.raises(ValueError, match="^reward_fn"):
        Rewards("function", [])


def _reward_model_dir(tmp_path, seed=0):
    """A tiny AutoModelForSequenceClassification and its tokenizer, written as a local directory."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from hydra_kernels.rlhf.demo.tokenizer import build_char_tokenizer
    tok = build_char_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, num_labels=1,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(cfg).eval()
    path = tmp_path / "rm"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model, tok


def test_reward_model_directory_scores_with_its_own_tokenizer(tmp_path):
    path, model, tok = _reward_model_dir(tmp_path)
    rm = RewardModel(path)
    prompts, completions = ["1+1=", "12+30="], ["2", "42"]
    got = rm(prompts, completions)
    with torch.no_grad():
        for i, (p, c) in enumerate(zip(prompts, completions)):           # one at a time: no padding at all
            ids = torch.tensor([tok.encode(p + c, add_special_tokens=False)])
            assert got[i].item() == pytest.approx(model(input_ids=ids).logits[0, 0].item(), rel=1e-5, abs=1e-6)
    r, per = build_rewards("model", reward_model=str(path))(RewardInputs(prompts, completions, [[], []],
                                                                         [True, True]), torch.device("cpu"))
    assert torch.equal(r, got) and list(per) == ["rm"]
    with pytest.raises(ValueError, match="^reward_model: no such directory"):
        RewardModel(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="^reward_model"):
        RewardModel(tmp_path / "empty")


def test_grpo_with_a_reward_model(tmp_path):
    from tests.rlhf._grpo_job import run
    path, _, _ = _reward_model_dir(tmp_path)
    _, res = run(tmp_path / "run", ["steps=1", f"reward_model={path}"], reward_fn=None)
    assert "rewards/rm/mean" in res.history[0] and res.history[0]["reward"] == pytest.approx(
        res.history[0]["rewards/rm/mean"])


def test_ppo_takes_trl_style_and_weighted_functions_and_a_reward_model(tmp_path):
    def length(completions, **kwargs):
        return [len(c) / 4 for c in completions]

    _, res = run_ppo(tmp_path / "a", ["reward_source=function", "reward_weights=[1.0,0.5]", "steps=1"],
                     reward_fn=[digit_reward, length])
    h = res.history[0]
    assert h["objective/scores"] == pytest.approx(h["rewards/digit_reward/mean"] + 0.5 * h["rewards/length/mean"])
    path, _, _ = _reward_model_dir(tmp_path)
    _, res = run_ppo(tmp_path / "b", ["reward_source=model", f"reward_model={path}", "steps=1"])
    assert "rewards/rm/mean" in res.history[0]
    with pytest.raises(ValueError, match="^reward_fn: given, but reward_source is 'head'"):
        run_ppo(tmp_path / "c", ["steps=1"], reward_fn=digit_reward)
    with pytest.raises(ValueError, match="^reward_model"):
        run_ppo(tmp_path / "d", ["steps=1", f"reward_model={path}"])
    with pytest.raises(ValueError, match="^reward_fn: <lambda> returned dict"):
        run_ppo(tmp_path / "e", ["reward_source=function", "steps=1"], reward_fn=lambda p, c, e: {"r": 1})


def test_reward_values_names_the_function():
    with pytest.raises(ValueError, match="^reward_fn: gold returned dict"):
        reward_values({}, 2, "gold")
