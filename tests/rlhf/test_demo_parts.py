"""The demo's building blocks: tokenizer round trip, task data and gold reward, PNG writer."""
import json
import zlib

import numpy as np
import pytest

from hydra_kernels.rlhf.demo import plot
from hydra_kernels.rlhf.demo.task import (ArithmeticTask, TaskConfig, answer_of, gold_reward, is_slip,
                                          mean_and_stderr, parse_prompt)
from hydra_kernels.rlhf.demo.tokenizer import EOS, PAD, save_char_tokenizer


def test_tokenizer_round_trip_and_reload(tmp_path):
    from transformers import AutoTokenizer

    save_char_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.pad_token == PAD and tok.eos_token == EOS
    assert len({tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id}) == 4
    for text in ("12+7=19", "0+0=0", "99+99=198", " 3 * (4-1) "):
        ids = tok(text)["input_ids"]
        assert len(ids) == len(text)                       # one token per character, nothing prepended
        assert tok.decode(ids) == text
    ids = tok("5+5=10")["input_ids"] + [tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "5+5=10"
    batch = tok(["1+1=", "12+13="], padding=True)
    assert batch["input_ids"][0][:2] == [tok.pad_token_id] * 2      # left padding for generation
    assert batch["attention_mask"][0] == [0, 0, 1, 1, 1, 1]
    assert tok.convert_ids_to_tokens(tok("a")["input_ids"]) == [tok.unk_token]


def test_tokenizer_rejects_bad_alphabet():
    from hydra_kernels.rlhf.demo.tokenizer import build_char_tokenizer

    with pytest.raises(ValueError, match="alphabet"):
        build_char_tokenizer("aa")
    with pytest.raises(ValueError, match="alphabet"):
        build_char_tokenizer("")


def test_gold_reward():
    assert gold_reward("12+7=", "19") == 1.0
    assert gold_reward("12+7=", " 19 ") == 1.0
    assert gold_reward("12+7=", "18") == pytest.approx(0.45)
    assert gold_reward("12+7=", "29") == 0.0                       # ten off: no credit, no penalty
    assert gold_reward("12+7=", "190") == 0.0
    assert gold_reward("12+7=", "19", ended=False) == -1.0        # cut off before EOS
    for garbage in ("", "1+9", "019", "abc", "19=19"):
        assert gold_reward("12+7=", garbage) == -1.0
    with pytest.raises(ValueError, match="prompt"):
        gold_reward("12-7=", "5")
    assert parse_prompt("37+48=") == (37, 48) and answer_of("37+48=") == 85
    assert is_slip("37+48=", "84") and is_slip("37+48=", "75") and is_slip("37+48=", "87")
    assert not is_slip("37+48=", "85") and not is_slip("37+48=", "58") and not is_slip("37+48=", "8")


def test_task_files_schema_split_and_determinism(tmp_path):
    cfg = TaskConfig(n_sft=300, n_pref=300, n_ppo=100, n_eval_prompts=50, n_eval_pairs=60, demo_error_rate=0.4)
    paths = ArithmeticTask(cfg).write(tmp_path / "a")
    again = ArithmeticTask(cfg).write(tmp_path / "b")
    read = {k: [json.loads(line) for line in open(p)] for k, p in paths.items()}
    for k in paths:
        assert open(paths[k]).read() == open(again[k]).read(), f"{k} differs between runs with the same seed"
    assert len(read["sft"]) == 300 and set(read["sft"][0]) == {"prompt", "completion"}
    assert set(read["pref"][0]) == {"prompt", "chosen", "rejected"} and set(read["ppo"][0]) == {"prompt"}
    assert len(read["eval_prompts"]) == 50 and len(read["eval_pairs"]) == 60
    # Demonstrations are imperfect at about the configured rate, and wrong ones are still plain numbers.
    rewards = [gold_reward(r["prompt"], r["completion"]) for r in read["sft"]]
    wrong = sum(r < 1.0 for r in rewards) / len(rewards)
    assert 0.3 < wrong < 0.5 and min(rewards) >= 0.0
    # Preferences: chosen is always the exact answer, rejected never is; about 60% of rejected are slips.
    for r in read["pref"] + read["eval_pairs"]:
        assert gold_reward(r["prompt"], r["chosen"]) == 1.0 > gold_reward(r["prompt"], r["rejected"])
    slips = sum(is_slip(r["prompt"], r["rejected"]) for r in read["pref"]) / len(read["pref"])
    assert 0.5 < slips < 0.7
    # carry_error_share: the wrong demonstrations are mostly off by ten when asked to be.
    carry = ArithmeticTask(TaskConfig(n_sft=400, n_pref=10, n_ppo=10, n_eval_prompts=10, n_eval_pairs=10,
                                      carry_error_share=0.8)).sft_records()
    wrong = [r for r in carry if gold_reward(r["prompt"], r["completion"]) < 1.0]
    tens = sum(abs(int(r["completion"]) - answer_of(r["prompt"])) == 10 for r in wrong) / len(wrong)
    assert 0.7 < tens < 0.9
    # Held-out prompts never occur in training files.
    train = {r["prompt"] for k in ("sft", "pref", "ppo") for r in read[k]}
    held = {r["prompt"] for k in ("eval_prompts", "eval_pairs") for r in read[k]}
    assert not train & held


def test_task_config_errors():
    with pytest.raises(ValueError, match="demo_error_rate"):
        TaskConfig(demo_error_rate=1.5)
    with pytest.raises(ValueError, match="n_sft"):
        TaskConfig(n_sft=0)
    with pytest.raises(ValueError, match="n_eval_prompts"):
        TaskConfig(max_operand=9, n_eval_prompts=50)


def test_mean_and_stderr():
    m, se = mean_and_stderr([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and se == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    assert mean_and_stderr([5.0]) == (5.0, 0.0)


def test_png_writer_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(7, 13, 3), dtype=np.uint8)
    plot.write_png(tmp_path / "x.png", img)
    data = (tmp_path / "x.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data.endswith(b"IEND\xaeB`\x82")
    assert zlib.crc32(b"IEND") == 0xAE426082
    np.testing.assert_array_equal(plot.read_png(tmp_path / "x.png"), img)
    with pytest.raises(ValueError, match="rgb"):
        plot.encode_png(np.zeros((4, 4), np.uint8))


def test_line_plot_draws_each_series(tmp_path):
    xs = np.arange(30)
    panels = [plot.Panel("gold reward", [(xs, np.sin(xs / 5))], colors=[plot.COLORS[2]]),
              plot.Panel("kl", [(xs, xs * 0.01), (xs, np.full(30, np.nan))], colors=[plot.COLORS[1], plot.COLORS[0]],
                         xlabel="PPO step")]
    path = plot.line_plot_png(tmp_path / "p.png", panels, title="demo")
    img = plot.read_png(path)
    assert img.shape == (36 + 2 * 250, 900, 3)
    top, bottom = img[36:36 + 250], img[36 + 250:]
    has = lambda part, c: bool((part == np.array(c, np.uint8)).all(-1).any())
    assert has(top, plot.COLORS[2]) and not has(top, plot.COLORS[1])
    assert has(bottom, plot.COLORS[1])
    assert (img == 255).all(-1).mean() > 0.5                      # mostly background, not a blot


def test_nice_ticks():
    assert plot.nice_ticks(0.0, 1.0, 5) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert plot.nice_ticks(-0.13, 0.41, 6) == pytest.approx([-0.1, 0.0, 0.1, 0.2, 0.3, 0.4])
    assert plot.nice_ticks(-0.13, 0.41, 4) == pytest.approx([0.0, 0.2, 0.4])
    with pytest.raises(ValueError, match="lo/hi"):
        plot.nice_ticks(float("nan"), 1.0)
