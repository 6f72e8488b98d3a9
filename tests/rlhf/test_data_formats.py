"""TRL's standard formats from Python (lists of dicts, datasets.Dataset), the sequence checks of the loops'
entry points, and the truncation counts."""
import warnings

import pytest

from hydra_kernels.rlhf.data import (PreferencePair, PromptData, SFTExample, Truncation, as_preference_pairs,
                                     as_prompts, as_sft_examples, collate_sequences, count_truncation, encode_prompt,
                                     encode_response, load_preference_data, load_prompt_data, load_sft_data,
                                     report_truncation, tokenize_pairs, tokenize_prompts, tokenize_sft)
from tests.rlhf._tiny import CharTokenizer


def test_sft_standard_formats():
    assert load_sft_data([{"prompt": "1+1=", "completion": "2", "id": 7}]) == [SFTExample("1+1=", "2")]
    # Language modeling: the whole text is the completion of an empty prompt (the loss covers all of it).
    assert load_sft_data([{"text": "1+1=2"}, {"text": "2+2=4"}]) == [SFTExample("", "1+1=2"), SFTExample("", "2+2=4")]
    tok = CharTokenizer()
    b = tokenize_sft(tok, load_sft_data([{"text": "1+1=2"}]), max_prompt_len=8, max_len=16)
    assert b.input_ids[0].tolist() == [tok.bos_token_id] + tok.encode("1+1=2") + [tok.eos_token_id]
    assert b.loss_mask[0].tolist() == [0] + [1] * 6
    # prompt/completion wins over text when a row has both (as TRL's SFT trainer reads it)
    assert load_sft_data([{"text": "x", "prompt": "1", "completion": "2"}]) == [SFTExample("1", "2")]


def test_preference_standard_formats():
    assert load_preference_data([{"prompt": "1+1=", "chosen": "2", "rejected": "3"}]) == \
        [PreferencePair("1+1=", "2", "3")]
    # Implicit prompt: the longest common prefix, a trailing space going to the responses (TRL's extract_prompt).
    assert load_preference_data([{"chosen": "The sky is blue.", "rejected": "The sky is green."}]) == \
        [PreferencePair("The sky is", " blue.", " green.")]
    assert load_preference_data([{"chosen": "12+3=15", "rejected": "12+3=16"}]) == \
        [PreferencePair("12+3=1", "5", "6")]
    assert load_preference_data([{"chosen": "a", "rejected": "b"}]) == [PreferencePair("", "a", "b")]


@pytest.mark.parametrize("row, message", [
    ({"chosen": "1+1=2", "rejected": "1+1=2"}, r"pairs\[0\]: field 'chosen': nothing is left after the prompt"),
    ({"chosen": "1+1=2", "rejected": "1+1=23"}, r"pairs\[0\]: field 'chosen': nothing is left"),
    ({"chosen": "1+1=2", "rejected": 3}, r"pairs\[0\]: field 'rejected': expected a string, got int"),
    ({"prompt": "1", "chosen": "2"}, r"pairs\[0\]: field 'rejected': missing"),
])
def test_bad_preference_rows(row, message):
    with pytest.raises(ValueError, match=message):
        load_preference_data([row])


def test_prompts_keep_their_rows():
    rows = [{"prompt": "1+1=", "answer": 2, "meta": {"k": [1]}}, {"prompt": "2+2=", "answer": 4, "meta": None}]
    got = load_prompt_data(rows)
    assert got == PromptData(["1+1=", "2+2="], rows)
    assert got.records[0] is not rows[0]          # copies: the caller's rows are never changed through them
    prompts, records = as_prompts(["1+1=", "2+2="])
    assert prompts == ["1+1=", "2+2="] and records == [{"prompt": "1+1="}, {"prompt": "2+2="}]


def test_datasets_dataset_in_python():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": "4"}])
    assert load_sft_data(ds) == as_sft_examples(ds) == [SFTExample("1+1=", "2"), SFTExample("2+2=", "4")]
    assert load_sft_data(ds.with_format("numpy")) == load_sft_data(ds)      # whatever format the dataset is set to
    # datasets fills a column a row lacks with None: the text rows below are not prompt/completion rows
    mixed = datasets.Dataset.from_list([{"text": "12"}, {"text": "34", "prompt": None}])
    assert load_sft_data(mixed) == [SFTExample("", "12"), SFTExample("", "34")]
    pairs = datasets.Dataset.from_dict({"chosen": ["1+1=2"], "rejected": ["1+1=3"]})
    assert as_preference_pairs(pairs) == [PreferencePair("1+1=", "2", "3")]
    prompts = datasets.Dataset.from_dict({"prompt": ["1+1="], "answer": ["2"]})
    assert as_prompts(prompts) == PromptData(["1+1="], [{"prompt": "1+1=", "answer": "2"}])
    bad = datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": ""}])
    with pytest.raises(ValueError, match=r"demonstrations\[1\]: field 'completion': empty string"):
        as_sft_examples(bad)
    split = datasets.DatasetDict({"train": ds})
    assert load_sft_data(split) == load_sft_data(ds)
    with pytest.raises(ValueError, match=r"demonstrations: a DatasetDict with splits \['train', 'test'\]: give one"):
        load_sft_data(datasets.DatasetDict({"train": ds, "test": ds}))


def test_pandas_dataframe_rows():
    pd = pytest.importorskip("pandas")
    # Iterating a DataFrame gives its column names: they must not become the prompts "prompt" and "answer".
    df = pd.DataFrame({"prompt": ["1+1=", "2+2="], "answer": [2, 4]})
    assert as_prompts(df) == PromptData(["1+1=", "2+2="], [{"prompt": "1+1=", "answer": 2},
                                                         {"prompt": "2+2=", "answer": 4}])
    assert load_sft_data(pd.DataFrame({"text": ["12"]})) == [SFTExample("", "12")]


@pytest.mark.parametrize("value, message", [
    ("1+1=", r"prompts: expected a sequence of rows .*got a single str '1\+1='"),
    (b"1+1=", r"prompts: expected a sequence of rows .*got a single bytes"),
    ({"prompt": "1+1="}, r"prompts: expected a sequence of rows .*got a dict"),
    ({"1+1=", "2+2="}, r"prompts: expected a sequence of rows .*got set"),
    (3, r"prompts: expected a sequence of rows .*got int"),
    (["1+1=", 3], r"prompts\[1\]: expected a dict of fields, got int"),
    ([{"prompt": ["1+1="]}], r"prompts\[0\]: field 'prompt': message 0: expected a dict with 'role' and 'content'"),
])
def test_a_string_is_not_a_sequence_of_prompts(value, message):
    # train_ppo(prompts="1+1=") would otherwise train on the four prompts "1", "+", "1", "=".
    with pytest.raises(ValueError, match=message):
        as_prompts(value)


def test_sequence_checks_of_the_other_entry_points(tmp_path):
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="demonstrations: expected a sequence of rows .*got a single str"):
        as_sft_examples("1+1=2")
    with pytest.raises(ValueError, match="pairs: expected a sequence of rows .*got a single PosixPath"):
        as_preference_pairs(tmp_path / "pref.jsonl")          # a path is data only for the load_* functions
    with pytest.raises(ValueError, match=r"demonstrations\[0\]: field 'completion': missing"):
        as_sft_examples(["1+1="])
    with pytest.raises(ValueError, match="prompts: expected a sequence"):
        tokenize_prompts(tok, "1+1=", 8)
    with pytest.raises(ValueError, match="examples: expected a sequence"):
        tokenize_sft(tok, SFTExample("1", "2"), 8, 16)
    assert as_sft_examples([]) == [] and as_preference_pairs(()) == [] and as_prompts([]) == ([], [])
    examples = [SFTExample("1+1=", "2")]
    assert as_sft_examples(examples) == examples and as_sft_examples(iter(examples)) == examples
    assert as_preference_pairs([PreferencePair("1", "2", "3")]) == [PreferencePair("1", "2", "3")]
    with pytest.raises(ValueError, match=r"demonstrations\[0\]: field 'prompt': expected a string, got int"):
        as_sft_examples([SFTExample(1, "2")])
    with pytest.raises(ValueError, match="demonstrations: no records"):
        load_sft_data([])
    with pytest.raises(ValueError, match=r"demonstrations\[0\]: field 'prompt': missing \(an SFT row holds"):
        load_sft_data([{"question": "1+1="}])


def test_truncation_counts_match_what_the_batches_cut():
    tok = CharTokenizer()
    examples = [SFTExample("1" * n, "2" * m) for n in (0, 3, 6, 9) for m in (1, 4, 8)]
    P, L = 6, 12
    got = count_truncation(tok, examples, P, L)
    cut_p = sum(len(encode_prompt(tok, e.prompt, P)) < 1 + len(e.prompt) for e in examples)
    batch = collate_sequences([encode_prompt(tok, e.prompt, P) for e in examples],
                              [encode_response(tok, e.completion) for e in examples], tok.pad_token_id, L)
    cut_r = int((batch.loss_mask.sum(1) < batch.loss_mask.new_tensor([len(e.completion) + 1 for e in examples])).sum())
    assert got == Truncation(len(examples), cut_p, cut_r) and 0 < cut_p < len(examples) and 0 < cut_r < len(examples)
    pairs = [PreferencePair("12", "3", "4" * 9), PreferencePair("12", "3", "4")]
    assert count_truncation(tok, pairs, 4, 8) == Truncation(2, 0, 1)
    assert count_truncation(tok, ["123", "1234567"], 4) == Truncation(2, 1, 0)


def test_truncation_is_reported_once_with_counts():
    tok = CharTokenizer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = report_truncation(tok, [SFTExample("123456789", "1"), SFTExample("1", "2" * 20), SFTExample("1", "2")],
                              4, 8, name="demonstrations")
        assert report_truncation(tok, ["1", "2"], 4, name="prompts") == Truncation(2, 0, 0)
    assert t == Truncation(3, 1, 1)
    assert [str(w.message) for w in caught] == [
        "demonstrations: 1 of 3 prompts are longer than data.max_prompt_len=4 tokens and lose their first tokens; "
        "1 of 3 responses do not fit data.max_len=8 tokens after their prompt and lose their last tokens, EOS "
        "included"]
    assert all(w.category is RuntimeWarning for w in caught)
    with pytest.raises(ValueError, match="records: expected a sequence"):
        count_truncation(tok, "123", 4)
    b, _ = tokenize_pairs(tok, [PreferencePair("1", "2", "3")], 4, 8)
    assert b.input_ids.shape == (1, 4)


def test_training_entry_points_refuse_a_single_string(tmp_path):
    from hydra_kernels.rlhf import PPOConfig, SFTConfig, hydra_sft, new_reward_head, train_ppo
    from tests.rlhf._tiny import tiny_model
    tok = CharTokenizer()
    model = tiny_model(len(tok))
    run = {"output_dir": str(tmp_path / "run"), "progress": False}
    with pytest.raises(ValueError, match="^prompts: "):
        train_ppo(model, new_reward_head(model), tok, "1+1=", PPOConfig(steps=1, run=run))
    with pytest.raises(ValueError, match="^demonstrations: "):
        hydra_sft(model, tok, "1+1=2", [], SFTConfig(run=run))
