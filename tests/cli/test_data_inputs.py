"""`hydra-rlhf sft` / `ppo` on a TRL user's data: parquet files and save_to_disk directories (read as the same
records as the JSONL files: the runs give the same numbers), conversational rows rendered with the model's chat
template, and bad inputs as one-line errors naming the file and row."""
import json

import pytest

from tests.cli._local import PPO_SMALL, SFT_SMALL, assert_one_line_error, cli, make_local

datasets = pytest.importorskip("datasets")


def _rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _save(rows, path, kind):
    ds = datasets.Dataset.from_list(rows)
    if kind == "parquet":
        ds.to_parquet(str(path))
    else:
        ds.save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_data")
    paths = make_local(root)
    for key in ("demos", "pairs", "prompts"):
        rows = _rows(paths[key])
        paths[f"{key}-parquet"] = _save(rows, root / f"{key}.parquet", "parquet")
        paths[f"{key}-dir"] = _save(rows, root / f"{key}-dataset", "dataset-dir")
    return root, paths


def _numbers(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    out.pop("output_dir")
    return out


def _sft(paths, out, demos, pairs, *extra):
    return cli("sft", f"model.path={paths['model']}", f"data.sft_path={demos}", f"data.preference_path={pairs}",
               f"run.output_dir={out}", *SFT_SMALL, *extra)


def _ppo(sft, prompts, out, *extra):
    return cli("ppo", f"model.path={sft}", f"data.prompt_path={prompts}", f"run.output_dir={out}", *PPO_SMALL, *extra)


def test_sft_on_parquet_and_a_dataset_directory(local, tmp_path):
    _, p = local
    want = _numbers(_sft(p, tmp_path / "jsonl", p["demos"], p["pairs"]))
    assert "eval/reward_accuracy" in want
    assert _numbers(_sft(p, tmp_path / "a", p["demos-parquet"], p["pairs-dir"])) == want
    assert _numbers(_sft(p, tmp_path / "b", p["demos-dir"], p["pairs-parquet"])) == want


def test_ppo_on_parquet_and_a_dataset_directory(local, tmp_path):
    _, p = local
    want = _numbers(_ppo(p["sft"], p["prompts"], tmp_path / "jsonl"))
    assert want["steps"] == 1
    assert _numbers(_ppo(p["sft"], p["prompts-parquet"], tmp_path / "a")) == want
    assert _numbers(_ppo(p["sft"], p["prompts-dir"], tmp_path / "b")) == want


def test_bad_inputs_are_one_line_errors(local, tmp_path):
    root, p = local
    bad = _save([{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": ""}],
                tmp_path / "bad.parquet", "parquet")
    assert_one_line_error(_sft(p, tmp_path / "out", bad, p["pairs"]),
                          f"{bad}:2: field 'completion': empty string")
    both = tmp_path / "splits"
    ds = datasets.Dataset.from_list(_rows(p["prompts"]))
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(both))
    assert_one_line_error(_ppo(p["sft"], both, tmp_path / "out"), f"{both}: a DatasetDict with splits")
    proc = _ppo(p["sft"], both / "test", tmp_path / "test_split")
    assert proc.returncode == 0, proc.stderr[-3000:]
    conv = _save([{"prompt": [{"role": "user", "content": "1+1="}]}], tmp_path / "conv.parquet", "parquet")
    assert_one_line_error(_ppo(p["sft"], conv, tmp_path / "out"), "tokenizer: has no chat template",
                          f"{conv}:1: field 'prompt' is conversational")


@pytest.fixture(scope="module")
def chat_local(tmp_path_factory):
    """A tiny model whose tokenizer has a ChatML-style chat template, and an (untrained) Hydra-SFT of it."""
    import torch

    from hydra_kernels import rlhf
    from hydra_kernels.rlhf.demo.model import TinyModelConfig, build_tiny_model, save_model
    from tests.rlhf.test_data_chat import chat_tokenizer

    root = tmp_path_factory.mktemp("cli_chat")
    tok = chat_tokenizer()
    model = build_tiny_model(tok, TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                                                  max_positions=96))
    save_model(model, tok, root / "model")
    rlhf.save_sft(root / "sft", rlhf.SFTResult(model, rlhf.new_reward_head(model, torch.Generator().manual_seed(0))),
                  tok, rlhf.SFTConfig())
    return root, tok


def test_conversational_sft_and_ppo(chat_local, tmp_path):
    root, tok = chat_local

    def user(text):
        return {"role": "user", "content": text}

    def assistant(text):
        return {"role": "assistant", "content": text}

    messages = [{"messages": [user(f"{a}+1?"), assistant(str(a + 1))]} for a in range(10, 18)]
    pairs = [{"chosen": [user(f"{a}+1?"), assistant(str(a + 1))], "rejected": [user(f"{a}+1?"), assistant(str(a))]}
             for a in range(10, 18)]
    demos = _save(messages, tmp_path / "messages.parquet", "parquet")
    prefs = _save(pairs, tmp_path / "pairs-dataset", "dataset-dir")
    lengths = ["data.max_prompt_len=40", "data.max_len=60"]
    proc = cli("sft", f"model.path={root / 'model'}", f"data.sft_path={demos}", f"data.preference_path={prefs}",
               f"run.output_dir={tmp_path / 'sft'}", *SFT_SMALL, *lengths)
    assert "eval/reward_accuracy" in _numbers(proc)
    # PPO on conversational prompts: the same run as on their rendered text given as standard prompts.
    conv = [{"prompt": [user(f"{a}+2?")]} for a in range(10, 18)]
    rendered = [{"prompt": tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
                 .removeprefix("<bos>")} for r in conv]
    (tmp_path / "rendered.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rendered))
    want = _numbers(_ppo(root / "sft", tmp_path / "rendered.jsonl", tmp_path / "p0", "data.max_prompt_len=40"))
    got = _numbers(_ppo(root / "sft", _save(conv, tmp_path / "prompts-dataset", "dataset-dir"), tmp_path / "p1",
                        "data.max_prompt_len=40"))
    assert got == want
