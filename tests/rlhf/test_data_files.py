"""Every file kind the loaders read (JSONL, JSON Lines and JSON arrays, parquet, CSV/TSV, save_to_disk
directories) for demonstrations, preference pairs and prompts, and their errors: <file>:<line or row>: field."""
import json

import pytest

from hydra_kernels.rlhf.data import (PreferencePair, PromptData, SFTExample, check_source, load_preference_data,
                                     load_prompt_data, load_prompt_jsonl, load_sft_data, load_sft_jsonl)

datasets = pytest.importorskip("datasets")

SFT = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "", "completion": "é 😀"}]
TEXT = [{"text": "1+1=2"}, {"text": "2+2=4"}]
PREF = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "2+2=", "chosen": "4", "rejected": "5"}]
IMPLICIT = [{"chosen": "1+1=2", "rejected": "1+1=3"}]
PROMPTS = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}]
KINDS = ["jsonl", "json-lines", "json-array", "parquet", "csv", "tsv", "dataset-dir"]


def write(path_stem, kind: str, rows: list[dict]) -> str:
    """rows in a file (or directory) of `kind`, written as a user's tools write them."""
    stem = str(path_stem)
    if kind == "jsonl":
        path = stem + ".jsonl"
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    elif kind == "json-lines":                      # Dataset.to_json's default
        path = stem + ".json"
        datasets.Dataset.from_list(rows).to_json(path)
    elif kind == "json-array":
        path = stem + ".json"
        with open(path, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2, ensure_ascii=False)
    elif kind == "parquet":
        path = stem + ".parquet"
        datasets.Dataset.from_list(rows).to_parquet(path)
    elif kind in ("csv", "tsv"):
        path = f"{stem}.{kind}"
        datasets.Dataset.from_list(rows).to_csv(path, index=False, sep="\t" if kind == "tsv" else ",")
    else:
        path = stem + "-dataset"
        datasets.Dataset.from_list(rows).save_to_disk(path)
    return path


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_for_each_stage(tmp_path, kind):
    assert load_sft_data(write(tmp_path / "sft", kind, SFT)) == [SFTExample("1+1=", "2"), SFTExample("", "é 😀")]
    assert load_sft_data(write(tmp_path / "text", kind, TEXT)) == [SFTExample("", "1+1=2"), SFTExample("", "2+2=4")]
    assert load_preference_data(write(tmp_path / "pref", kind, PREF)) == \
        [PreferencePair("1+1=", "2", "3"), PreferencePair("2+2=", "4", "5")]
    assert load_preference_data(write(tmp_path / "implicit", kind, IMPLICIT)) == [PreferencePair("1+1=", "2", "3")]
    assert load_prompt_data(write(tmp_path / "prompts", kind, PROMPTS)) == PromptData(["1+1=", "2+2="], PROMPTS)


def test_csv_reads_text_as_written(tmp_path):
    # Cells stay strings ("2", "007", "nan" and an empty prompt are not numbers or missing values).
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\n1+1=,2\n"a, ""quoted""\nprompt",007\n,nan\n', encoding="utf-8")
    assert load_sft_data(path) == [SFTExample("1+1=", "2"), SFTExample('a, "quoted"\nprompt', "007"),
                                   SFTExample("", "nan")]


def test_a_save_to_disk_split(tmp_path):
    ds = datasets.Dataset.from_list(SFT)
    datasets.DatasetDict({"train": ds}).save_to_disk(tmp_path / "one")
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(tmp_path / "two")
    assert load_sft_data(tmp_path / "one") == load_sft_data(tmp_path / "two" / "train") == load_sft_data(ds)
    assert load_sft_data(tmp_path / "two" / "test") == [SFTExample("1+1=", "2")]
    with pytest.raises(ValueError, match=r"two: a DatasetDict with splits \['train', 'test'\]: give one split "
                                         r"\(DIR/<split>"):
        load_sft_data(tmp_path / "two")


def test_no_longer_misread(tmp_path):
    # A parquet file is not text (it was read as JSONL: "not valid UTF-8"); a dataset directory is not a file.
    path = write(tmp_path / "p", "parquet", SFT)
    assert load_sft_jsonl(path) == load_sft_data(path)
    (tmp_path / "noext").write_bytes(open(path, "rb").read())            # parquet by content, whatever its name
    assert load_sft_data(tmp_path / "noext") == load_sft_data(path)
    directory = write(tmp_path / "d", "dataset-dir", PROMPTS)
    assert load_prompt_jsonl(directory) == ["1+1=", "2+2="]
    with pytest.raises(ValueError, match=r"plain: a directory, but not a dataset written by datasets' save_to_disk"):
        (tmp_path / "plain").mkdir()
        load_sft_data(tmp_path / "plain")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match=r"broken\.parquet: not a readable parquet file"):
        load_sft_data(tmp_path / "broken.parquet")
    for name in ("nope.parquet", "nope.csv", "nope.json", "nope.jsonl", "nope"):
        with pytest.raises(ValueError, match=rf"{name}: cannot read: No such file or directory"):
            load_sft_data(tmp_path / name)
        with pytest.raises(ValueError, match=rf"{name}: cannot read: No such file or directory"):
            check_source(tmp_path / name)         # the same error, before anything is loaded
    check_source(path)
    check_source(directory)


def where(path: str, kind: str, k: int) -> str:
    """Where each kind reports its k-th record (from 1): the line it starts on (JSONL, JSON, CSV with its header)
    or its row (parquet, dataset directory)."""
    if kind == "json-array":
        text, at = open(path, encoding="utf-8").read(), -1
        for _ in range(k):
            at = text.index("{", at + 1)
        return f"{path}:{text.count(chr(10), 0, at) + 1}:"
    return f"{path}:{k + 1 if kind in ('csv', 'tsv') else k}:"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stage, rows, message", [
    ("sft", [SFT[0], {"prompt": "2+2=", "completion": ""}], "field 'completion': empty string"),
    ("sft", [TEXT[0], {"text": ""}], "field 'text': empty string"),
    ("pref", [PREF[0], {"prompt": "2+2=", "chosen": "", "rejected": "5"}], "field 'chosen': empty string"),
    ("pref", [IMPLICIT[0], {"chosen": "2+2=4", "rejected": "2+2=4"}], "field 'chosen': nothing is left after"),
])
def test_bad_record_names_file_row_and_field(tmp_path, kind, stage, rows, message):
    path = write(tmp_path / "bad", kind, rows)
    load = {"sft": load_sft_data, "pref": load_preference_data}[stage]
    with pytest.raises(ValueError) as e:
        load(path)
    assert str(e.value).startswith(f"{where(path, kind, 2)} {message}"), str(e.value)


@pytest.mark.parametrize("kind", ["jsonl", "json-array", "parquet", "dataset-dir"])
def test_bad_types_name_file_row_and_field(tmp_path, kind):
    path = write(tmp_path / "bad", kind, [{"prompt": "1+1=", "completion": "2"},
                                          {"prompt": "2+2=", "completion": None}])
    with pytest.raises(ValueError) as e:
        load_sft_data(path)
    assert str(e.value) == f"{where(path, kind, 2)} field 'completion': expected a string, got NoneType"
    path = write(tmp_path / "missing", kind, [{"prompt": "1+1="}])
    with pytest.raises(ValueError) as e:
        load_sft_data(path)
    assert str(e.value) == f"{where(path, kind, 1)} field 'completion': missing"
    path = write(tmp_path / "noprompt", kind, [{"completion": "2"}, {"completion": "3"}])
    with pytest.raises(ValueError) as e:
        load_prompt_data(path)
    assert str(e.value) == f"{where(path, kind, 1)} field 'prompt': missing"


def test_csv_and_json_errors(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("prompt,completion\n1+1=,2\n2+2=,4,extra\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"d\.csv:3: 3 fields, but the header \(line 1\) has 2"):
        load_sft_data(csv_path)
    csv_path.write_bytes(b"prompt,completion\n1+1=,2\n2+2=,\xff\n")
    with pytest.raises(ValueError, match=r"d\.csv:3: not valid UTF-8 \(byte 0xff at column 6\)"):
        load_sft_data(csv_path)
    csv_path.write_text("prompt,prompt\n1,2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"d\.csv:1: column 'prompt' appears twice in the header"):
        load_sft_data(csv_path)
    js = tmp_path / "a.json"
    js.write_text('[\n {"prompt": "1", "completion": "2"},\n {"prompt": "1", "completion": }\n]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"a\.json:3: not valid JSON \(Expecting value at column 32\)"):
        load_sft_data(js)
    js.write_text('[\n {"prompt": "1", "completion": "2"},\n ["1", "2"]\n]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"a\.json:3: expected a JSON object, got list"):
        load_sft_data(js)
    js.write_text('[{"prompt": "1", "completion": "2"}] []', encoding="utf-8")
    with pytest.raises(ValueError, match=r"a\.json:1: not valid JSON \(extra data after the array\)"):
        load_sft_data(js)
    js.write_text("[]", encoding="utf-8")
    with pytest.raises(ValueError, match=r"a\.json: no records"):
        load_sft_data(js)


@pytest.mark.parametrize("name, text, line", [
    ("deep.jsonl", "[" * 100_000 + "]" * 100_000 + "\n", 1),
    ("deep.jsonl", json.dumps({"prompt": "1", "completion": "2"}) + "\n" + '{"prompt": ' + "[" * 100_000 + "\n", 2),
    ("deep.json", '[{"prompt": "1", "completion": "2"},\n' + '{"a": ' * 100_000 + "1" + "}" * 100_000 + "]", 2),
])
def test_deeply_nested_json_is_a_named_error(tmp_path, name, text, line):
    # json.loads raises RecursionError on these, which named neither the file nor the line.
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=rf"{name}:{line}: not valid JSON \(nested too deeply to read\)"):
        load_sft_data(tmp_path / name)
