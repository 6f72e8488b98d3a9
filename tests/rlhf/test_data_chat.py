"""Conversational datasets rendered with a chat template: the prompt with the generation prompt, the completion
as what the conversation adds to it, and the LM loss on exactly the assistant's tokens. `chat_tokenizer` (a local
char tokenizer with a ChatML-style template) is shared with tests/cli/test_data_inputs.py."""
import pytest

from hydra_kernels.rlhf.data import (PreferencePair, PromptData, SFTExample, load_preference_data, load_prompt_data,
                                     load_sft_data, tokenize_pairs, tokenize_prompts, tokenize_sft)
from tests.rlhf._tiny import CharTokenizer

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789+-=*()?.!, \n"
CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_tokenizer(eos: str = "<eos>", template: str | None = CHATML):
    """A PreTrainedTokenizerFast with one token per character, <pad> <eos> <bos> <unk> <|im_start|> <|im_end|>,
    and `template` as its chat template (none if None); `eos` is the eos token ("<|im_end|>": the template's end
    of turn, as in Qwen's instruct tokenizers)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + list(ALPHABET))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token=eos, bos_token="<bos>",
                                  unk_token="<unk>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = template
    return tok


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def rendered(tok, messages, **kw) -> str:
    return tok.apply_chat_template(messages, tokenize=False, **kw)


def test_prompt_completion_and_the_exact_loss_boundary():
    tok = chat_tokenizer()
    row = {"prompt": [{"role": "system", "content": "be brief"}, user("1+1?")], "completion": [assistant("2.")]}
    (ex,) = load_sft_data([row], tok)
    gen = rendered(tok, row["prompt"], add_generation_prompt=True)
    full = rendered(tok, row["prompt"] + row["completion"])
    # The prompt is the template's generation prompt less its BOS (encode_prompt adds the BOS token); the
    # completion is the rest of the conversation, the end of turn included; the layout appends EOS.
    assert gen.startswith("<bos>") and ex == SFTExample(gen[len("<bos>"):], full[len(gen):])
    assert ex.completion == "2.<|im_end|>\n"
    b = tokenize_sft(tok, [ex], max_prompt_len=64, max_len=96)
    ids, mask = b.input_ids[0].tolist(), b.loss_mask[0].tolist()
    # One token sequence: the whole conversation tokenized at once, then EOS; the loss starts at the first token
    # of the assistant's content and covers the rest.
    assert ids == tok.encode(full, add_special_tokens=False) + [tok.eos_token_id]
    n_prompt = len(tok.encode(gen, add_special_tokens=False))
    assert mask == [0] * n_prompt + [1] * (len(ids) - n_prompt)
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == "2.<|im_end|>\n<eos>"
    assert tok.decode(ids[:n_prompt], skip_special_tokens=False) == gen


def test_the_templates_end_of_turn_as_eos_is_not_doubled():
    tok = chat_tokenizer(eos="<|im_end|>")
    (ex,) = load_sft_data([{"prompt": [user("1+1?")], "completion": [assistant("2")]}], tok)
    assert ex.completion == "2"
    b = tokenize_sft(tok, [ex], 64, 96)
    ids, mask = b.input_ids[0].tolist(), b.loss_mask[0].tolist()
    assert ids == tok.encode(rendered(tok, [user("1+1?"), assistant("2")]).rstrip("\n"), add_special_tokens=False)
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == "2<|im_end|>"


def test_messages_give_one_example_per_assistant_turn():
    tok = chat_tokenizer()
    conv = [user("1+1?"), assistant("2"), user("and 2+2?"), assistant("4"), user("thanks")]
    got = load_sft_data([{"messages": conv}], tok)
    p1 = rendered(tok, conv[:1], add_generation_prompt=True)
    p2 = rendered(tok, conv[:3], add_generation_prompt=True)
    assert got == [SFTExample(p1[len("<bos>"):], "2<|im_end|>\n"), SFTExample(p2[len("<bos>"):], "4<|im_end|>\n")]
    # The second example's prompt holds the first turn (context), which it does not train.
    b = tokenize_sft(tok, got, 64, 128)
    trained = [tok.decode([i for i, m in zip(r, k) if m], skip_special_tokens=False)
               for r, k in zip(b.input_ids.tolist(), b.loss_mask.tolist())]
    assert trained == ["2<|im_end|>\n<eos>", "4<|im_end|>\n<eos>"]
    with pytest.raises(ValueError, match=r"demonstrations\[0\]: field 'messages': no assistant message"):
        load_sft_data([{"messages": [user("hi")]}], tok)
    with pytest.raises(ValueError, match=r"demonstrations\[0\]: field 'messages': message 0 is the assistant's"):
        load_sft_data([{"messages": [assistant("hi"), user("x"), assistant("y")]}], tok)


def test_conversational_preferences_explicit_and_implicit():
    tok = chat_tokenizer()
    explicit = {"prompt": [user("1+1?")], "chosen": [assistant("2")], "rejected": [assistant("3")]}
    implicit = {"chosen": [user("1+1?"), assistant("2")], "rejected": [user("1+1?"), assistant("3")]}
    gen = rendered(tok, [user("1+1?")], add_generation_prompt=True)[len("<bos>"):]
    want = PreferencePair(gen, "2<|im_end|>\n", "3<|im_end|>\n")
    assert load_preference_data([explicit], tok) == load_preference_data([implicit], tok) == [want]
    chosen, rejected = tokenize_pairs(tok, [want], 64, 96)
    assert (chosen.loss_mask.sum().item(), rejected.loss_mask.sum().item()) == (len("2") + 3, len("3") + 3)
    with pytest.raises(ValueError, match=r"pairs\[0\]: fields 'chosen' and 'rejected' share no first message"):
        load_preference_data([{"chosen": [user("a"), assistant("b")], "rejected": [user("c"), assistant("d")]}], tok)
    with pytest.raises(ValueError, match=r"pairs\[0\]: field 'chosen': nothing is left after the prompt"):
        load_preference_data([{"chosen": implicit["chosen"], "rejected": implicit["chosen"]}], tok)


def test_conversational_prompts_get_the_generation_prompt():
    tok = chat_tokenizer()
    rows = [{"prompt": [user("1+1?")], "answer": "2"},
            {"prompt": [user("1+1?"), assistant("the answer is")], "answer": "2"}]
    got = load_prompt_data(rows, tok)
    assert got.prompts[0] == "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"
    # As TRL: a prompt that ends with the assistant's message is continued, not closed.
    assert got.prompts[1].endswith("<|im_start|>assistant\nthe answer is")
    assert got.records == rows
    ids, mask = tokenize_prompts(tok, got.prompts, 64)
    assert ids[0, -1].item() == tok.encode("\n", add_special_tokens=False)[0]
    assert ids[1, mask[1].argmax()].item() == tok.bos_token_id       # one BOS, from encode_prompt


def test_no_chat_template_is_a_clear_error():
    rows = [{"prompt": [user("1+1?")], "completion": [assistant("2")]}]
    for tok in (chat_tokenizer(template=None), CharTokenizer()):
        with pytest.raises(ValueError, match=r"tokenizer: has no chat template .* but demonstrations\[0\]: field "
                                             r"'prompt' is conversational"):
            load_sft_data(rows, tok)
    with pytest.raises(ValueError, match=r"tokenizer: needed to render conversational data"):
        load_prompt_data([{"prompt": [user("1+1?")]}])
    # Standard rows need no template.
    assert load_sft_data([{"prompt": "1+1=", "completion": "2"}], CharTokenizer()) == [SFTExample("1+1=", "2")]


@pytest.mark.parametrize("row, message", [
    ({"prompt": [user("a")], "completion": "b"}, r"\[1\]: field 'completion': expected a list of \{role, content\}"),
    ({"prompt": "a", "completion": [assistant("b")]}, r"\[1\]: field 'prompt': expected a list of \{role, content\}"),
    ({"prompt": [user("a")], "completion": []}, r"\[1\]: field 'completion': empty list"),
    ({"prompt": [{"role": "user"}], "completion": [assistant("b")]}, r"\[1\]: field 'prompt': message 0: 'content' "
                                                                     r"missing"),
    ({"prompt": [{"role": "user", "content": 3}], "completion": [assistant("b")]},
     r"\[1\]: field 'prompt': message 0: 'content': expected a string, got int"),
    ({"prompt": [user("\ud800")], "completion": [assistant("b")]}, r"\[1\]: field 'prompt': message 0: 'content': "
                                                                  r"not valid Unicode"),
    ({"prompt": [user("a")], "completion": [assistant("")]}, r"\[1\]: field 'completion': renders to nothing"),
])
def test_bad_conversational_rows(row, message):
    tok = chat_tokenizer(eos="<|im_end|>")
    good = {"prompt": [user("a")], "completion": [assistant("b")]}
    with pytest.raises(ValueError, match=r"demonstrations" + message):
        load_sft_data([good, row], tok)


def test_template_failures_and_mismatches_are_named():
    strict = chat_tokenizer(template="{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}"
                                     "{% endif %}" + CHATML)
    with pytest.raises(ValueError, match=r"demonstrations\[0\]: field 'prompt': the tokenizer's chat template "
                                         r"failed: system first"):
        load_sft_data([{"prompt": [user("a")], "completion": [assistant("b")]}], strict)
    # A template whose generation prompt is not how it renders the assistant's turn: no exact cut exists.
    odd = chat_tokenizer(template=CHATML.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>bot\n{% endif %}"))
    with pytest.raises(ValueError, match=r"demonstrations\[0\]: field 'completion': the chat template renders the "
                                         r"conversation with a start that differs from the prompt rendered alone"):
        load_sft_data([{"prompt": [user("a")], "completion": [assistant("b")]}], odd)


@pytest.mark.parametrize("kind", ["jsonl", "json-array", "parquet", "dataset-dir"])
def test_conversational_files(tmp_path, kind):
    pytest.importorskip("datasets")
    from tests.rlhf.test_data_files import write

    tok = chat_tokenizer()
    sft = write(tmp_path / "sft", kind, [{"messages": [user("1+1?"), assistant("2")]}])
    pref = write(tmp_path / "pref", kind, [{"prompt": [user("1+1?")], "chosen": [assistant("2")],
                                            "rejected": [assistant("3")]}])
    prompts = write(tmp_path / "prompts", kind, [{"prompt": [user("1+1?")], "answer": "2"}])
    gen = rendered(tok, [user("1+1?")], add_generation_prompt=True)[len("<bos>"):]
    assert load_sft_data(sft, tok) == [SFTExample(gen, "2<|im_end|>\n")]
    assert load_preference_data(pref, tok) == [PreferencePair(gen, "2<|im_end|>\n", "3<|im_end|>\n")]
    assert load_prompt_data(prompts, tok) == PromptData([gen], [{"prompt": [user("1+1?")], "answer": "2"}])
    # datasets stores messages with one set of keys, None where a message lacks one: such keys are dropped.
    tools = write(tmp_path / "tools", kind, [{"messages": [user("1+1?"), {"role": "assistant", "content": "2",
                                                                            "name": "calc"}]}])
    assert load_sft_data(tools, tok) == [SFTExample(gen, "2<|im_end|>\n")]
    bad = write(tmp_path / "bad", kind, [{"messages": [user("1+1?"), assistant("2")]}, {"messages": [user("x")]}])
    with pytest.raises(ValueError, match=r"bad[^:]*:\d+: field 'messages': no assistant message"):
        load_sft_data(bad, tok)
