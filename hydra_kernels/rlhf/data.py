"""Inputs for Hydra-SFT and PPO in TRL's dataset formats, tokenization and collation.

Sources: a file (.jsonl/.ndjson, .json: JSON Lines or one array of objects, .parquet, .csv/.tsv), a directory
written by `datasets`' save_to_disk (a DatasetDict needs one split: DIR/<split>), a `datasets.Dataset`, or a list
of dicts. Everything is local. A bad record raises ValueError("<where>: field '<name>': <why>"), where <where> is
<file>:<line> (JSONL, JSON, CSV), <file>:<row> (parquet, dataset directory; rows count from 1) or <name>[<index>].

Formats (TRL's "standard" and "conversational"; the type is told by the first row's fields, extra fields are kept
or ignored; conversational fields are lists of {"role", "content"} messages):
    SFT          {"prompt", "completion"} | {"text"} | {"messages"}        -> SFTExample(prompt, completion)
    preferences  {"prompt", "chosen", "rejected"} | {"chosen", "rejected"}  -> PreferencePair(prompt, chosen, rejected)
    PPO prompts  {"prompt"}                                                 -> prompt string (+ the row: PromptData)
Standard text is used verbatim. `text` is a completion with an empty prompt (the LM loss covers all of it). An
implicit prompt is the longest common prefix of chosen and rejected (TRL's extract_prompt: characters, a trailing
space staying with the responses; or whole messages). Conversational rows are rendered with the tokenizer's chat
template: the prompt with the generation prompt (continuing it when its last message is the assistant's), the
completion as what prompt + completion adds to it, less the template's final EOS (the response layout appends one)
and less a leading BOS of the prompt (encode_prompt adds one). `messages` gives one SFTExample per assistant
message, with the conversation before it as the prompt, so the loss covers exactly the assistant turns.

Tokenizer contract (Hugging Face tokenizers satisfy it; so does the demo's char tokenizer):
    encode(text, add_special_tokens=False) -> list[int]
    decode(ids, skip_special_tokens=True) -> str
    eos_token_id: int;  pad_token_id: int, distinct from eos;  bos_token_id: int | None
    (conversational data only) apply_chat_template and a chat_template
Pad token policy: a tokenizer without a pad token, or with pad == eos, is REJECTED (ValueError), because
pad == eos corrupts reward positions and value targets. `add_pad_token(tokenizer, model)` adds a distinct
one to a Hugging Face tokenizer and resizes the model's embeddings; call it before patching the model.

Token layout (a prompt is tokenized on its own and the response on its own, so the boundary is exact):
    prompt   = [bos] + encode(prompt)        (bos only when the tokenizer has one distinct from eos;
                                              prompts longer than max_prompt_len keep their last tokens)
    response = encode(completion) + [eos]    (cut at the right where prompt + response exceed max_len)
Everything is LEFT-padded, so the last real token of every row sits at the last column (the reward head
reads there) and generation appends to the right; position ids come from the mask (cumsum − 1).
`report_truncation` counts (and warns about) what the length limits cut.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from hydra_kernels.integrations import position_ids_from_attention_mask

# The name rlhf.rollout imports; the one definition is integrations'.
position_ids_from_mask = position_ids_from_attention_mask


@dataclass(frozen=True)
class SFTExample:
    prompt: str
    completion: str


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


class PromptData(NamedTuple):
    """PPO prompts: `prompts[i]` is the text to generate from (rendered with the chat template for a
    conversational row); `records[i]` is row i as read, every field included (the raw "prompt" too), for reward
    functions that take the dataset's other columns."""
    prompts: list[str]
    records: list[dict]


MESSAGES = "a list of {role, content} messages"


# ------------------------------------------------------------------------------------------- reading
def _cannot_read(path: str, e: OSError) -> ValueError:
    return ValueError(f"{path}: cannot read: {e.strerror or e}")


def _utf8_error(path: str, lineno: int, line: str) -> ValueError | None:
    """The error for a line read with errors="surrogateescape" that held bytes that are not UTF-8, else None."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as e:
        return ValueError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{ord(line[e.start]) - 0xDC00:02x} at "
                          f"column {e.start + 1})")
    return None


def _open_text(path: str, **kw):
    try:
        # utf-8-sig: a byte-order mark is skipped; surrogateescape: invalid bytes are reported with their line.
        return open(path, encoding="utf-8-sig", errors="surrogateescape", **kw)
    except OSError as e:
        raise _cannot_read(path, e) from None


def _json_value(path: str, lineno: int, parse, hint: str = "", *, in_file: bool = False):
    """parse() -> a JSON value; its errors as ValueError at `lineno` (or, with in_file, where the decoder failed in
    the whole file's text)."""
    try:
        return parse()
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno if in_file else lineno}: not valid JSON ({e.msg} at column {e.colno})"
                         f"{hint}") from None
    except RecursionError:
        raise ValueError(f"{path}:{lineno}: not valid JSON (nested too deeply to read){hint}") from None


def _jsonl_rows(path: str, f, hint: str = "") -> Iterator[tuple[str, dict]]:
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            err = _utf8_error(path, lineno, line)
            if err:
                raise err
            obj = _json_value(path, lineno, lambda: json.loads(line), hint)
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield f"{path}:{lineno}", obj


def _json_array_rows(path: str, text: str) -> Iterator[tuple[str, dict]]:
    """The objects of one JSON array, each located by the line it starts on (decoded one by one)."""
    for lineno, line in enumerate(text.split("\n"), 1):
        err = _utf8_error(path, lineno, line)
        if err:
            raise err
    decoder, n = json.JSONDecoder(), len(text)
    pos, line, seen = text.index("[") + 1, 1, 0

    def skip(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    def line_of(i: int) -> int:
        nonlocal line, seen
        line, seen = line + text.count("\n", seen, i), i
        return line

    pos = skip(pos)
    if pos < n and text[pos] == "]":
        pos += 1
    else:
        while True:
            start = line_of(pos)
            obj, pos = _json_value(path, start, lambda: decoder.raw_decode(text, pos), in_file=True)
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{start}: expected a JSON object, got {type(obj).__name__}")
            yield f"{path}:{start}", obj
            pos = skip(pos)
            if pos < n and text[pos] == ",":
                pos = skip(pos + 1)
                continue
            if pos < n and text[pos] == "]":
                pos += 1
                break
            raise ValueError(f"{path}:{line_of(min(pos, n))}: not valid JSON (expected ',' or ']' after an array "
                             f"item)")
    if skip(pos) < n:
        raise ValueError(f"{path}:{line_of(skip(pos))}: not valid JSON (extra data after the array)")


def _json_rows(path: str) -> Iterator[tuple[str, dict]]:
    f = _open_text(path)
    head = f.read(4096).lstrip()
    f.seek(0)
    if head.startswith("["):
        with f:
            text = f.read()
        if text.startswith("\ufeff"):
            text = text[1:]
        return _json_array_rows(path, text)
    return _jsonl_rows(path, f, " (a .json file is read as JSON Lines, one object per line, or as one array of "
                                "objects)")


def _csv_rows(path: str, delimiter: str) -> Iterator[tuple[str, dict]]:
    f = _open_text(path, newline="")

    def lines():
        for lineno, line in enumerate(f, 1):
            err = _utf8_error(path, lineno, line)
            if err:
                raise err
            yield line

    reader = csv.reader(lines(), delimiter=delimiter, strict=True)
    header, header_line, done = None, 0, 0
    with f:
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise ValueError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
            start, done = done + 1, reader.line_num
            if not row:
                continue
            if header is None:
                header, header_line = row, start
                dup = sorted({c for c in header if header.count(c) > 1})
                if dup:
                    raise ValueError(f"{path}:{start}: column '{dup[0]}' appears twice in the header")
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}:{start}: {len(row)} fields, but the header (line {header_line}) has "
                                 f"{len(header)}")
            yield f"{path}:{start}", dict(zip(header, row))


def _parquet_rows(path: str) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading parquet needs pyarrow (pip install datasets)") from None
    try:
        f = open(path, "rb")
    except OSError as e:
        raise _cannot_read(path, e) from None
    with f:
        try:
            row = 0
            for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
                for r in batch.to_pylist():
                    row += 1
                    yield f"{path}:{row}", r
        except (OSError, pyarrow.ArrowException) as e:
            raise ValueError(f"{path}: not a readable parquet file ({e})") from None


def _hf_dataset_kind(obj) -> str | None:
    """"dataset", "dict" (a DatasetDict) or None. Without `datasets` imported, no object can be one."""
    ds = sys.modules.get("datasets")
    if ds is None:
        return None
    if isinstance(obj, (ds.DatasetDict, ds.IterableDatasetDict)):
        return "dict"
    return "dataset" if isinstance(obj, (ds.Dataset, ds.IterableDataset)) else None


def _hf_rows(ds, label: str, where) -> Iterator[tuple[str, dict]]:
    if _hf_dataset_kind(ds) == "dict":
        splits = list(ds)
        if len(splits) != 1:
            raise ValueError(f"{label}: a DatasetDict with splits {splits}: give one split (DIR/<split> for a "
                             f"save_to_disk directory, dataset['<split>'] in Python)")
        ds = ds[splits[0]]
    if isinstance(ds, sys.modules["datasets"].Dataset):
        # In arrow batches (5x faster than row by row); the rows as Python objects, whatever format ds is set to.
        i = 0
        for table in ds.with_format("arrow").iter(batch_size=1024):
            for r in table.to_pylist():
                yield where(i), r
                i += 1
        return
    for i, r in enumerate(ds.with_format(None)):
        yield where(i), dict(r)


def _dataset_dir_rows(path: str) -> Iterator[tuple[str, dict]]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{path}: a dataset directory needs the datasets package (pip install datasets)") from None
    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError as e:
        raise ValueError(f"{path}: a directory, but not a dataset written by datasets' save_to_disk ({e}); give a "
                         f"file or such a directory") from None
    return _hf_rows(ds, path, lambda i: f"{path}:{i + 1}")


def _file_rows(path: str) -> Iterator[tuple[str, dict]]:
    if os.path.isdir(path):
        return _dataset_dir_rows(path)
    ext = os.path.splitext(path)[1].lower()
    if ext in (".parquet", ".pq"):
        return _parquet_rows(path)
    if ext in (".csv", ".tsv"):
        return _csv_rows(path, "\t" if ext == ".tsv" else ",")
    if ext == ".json":
        return _json_rows(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise _cannot_read(path, e) from None
    # Any other name is JSON Lines, as it always was, unless it is a parquet file by content.
    return _parquet_rows(path) if magic == b"PAR1" else _jsonl_rows(path, _open_text(path))


def check_source(path: str | os.PathLike) -> None:
    """The loaders' error for a missing or unreadable path, early (before a model is loaded): ValueError
    "<path>: cannot read: <why>"."""
    path = os.fspath(path)
    if not os.access(path, os.R_OK):
        try:
            os.stat(path)
        except OSError as e:
            raise _cannot_read(path, e) from None
        raise ValueError(f"{path}: cannot read: Permission denied")


def _rows(source, name: str, *, paths: bool) -> Iterator[tuple[str, Mapping]]:
    """(where, row) for each row of `source`; rows are mappings, record dataclasses become theirs."""
    if isinstance(source, (str, os.PathLike)) and paths:
        yield from _file_rows(os.fspath(source))
        return
    if isinstance(source, (str, bytes, bytearray, os.PathLike)):
        text = os.fspath(source) if isinstance(source, os.PathLike) else source
        raise ValueError(f"{name}: expected a sequence of rows (a list, or a datasets.Dataset), got a single "
                         f"{type(source).__name__} {text[:40]!r}; wrap one item in a list, or read a file with "
                         f"the load_*_data functions")
    if _hf_dataset_kind(source):
        yield from _hf_rows(source, name, lambda i: f"{name}[{i}]")
        return
    if type(source).__module__.startswith("pandas") and callable(getattr(source, "to_dict", None)):
        source = source.to_dict("records")      # a DataFrame (iterating one gives its column names)
    if isinstance(source, Mapping) or isinstance(source, (set, frozenset)) or not isinstance(source, Iterable):
        what = "a dict (for columns, use datasets.Dataset.from_dict)" if isinstance(source, Mapping) else \
            f"{type(source).__name__}"
        raise ValueError(f"{name}: expected a sequence of rows (a list, or a datasets.Dataset), got {what}")
    for i, r in enumerate(source):
        if isinstance(r, (SFTExample, PreferencePair)):
            r = dataclasses.asdict(r)
        elif isinstance(r, str):
            r = {"prompt": r}           # a plain prompt string (PPO); elsewhere its missing fields are reported
        elif not isinstance(r, Mapping):
            raise ValueError(f"{name}[{i}]: expected a dict of fields, got {type(r).__name__}")
        yield f"{name}[{i}]", r


# ------------------------------------------------------------------------------------------- fields
def _present(row: Mapping) -> set:
    # datasets fills a column a row lacks with None: such a field counts as absent when telling the format
    return {k for k, v in row.items() if v is not None}


def _text(where: str, row: Mapping, name: str) -> str:
    if name not in row:
        raise ValueError(f"{where}: field '{name}': missing")
    value = row[name]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field '{name}': expected a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{where}: field '{name}': not valid Unicode (an unpaired surrogate escape such as "
                         f"\\ud800)") from None
    return value


def _nonempty(where: str, name: str, value: str) -> str:
    # An empty response trains nothing and has no last token to reward; an empty prompt is allowed.
    if not value:
        raise ValueError(f"{where}: field '{name}': empty string")
    return value


def _messages(where: str, row: Mapping, name: str) -> list[dict]:
    if name not in row:
        raise ValueError(f"{where}: field '{name}': missing")
    value = row[name]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: field '{name}': expected {MESSAGES} (as the first row has), got "
                         f"{type(value).__name__}")
    if not value:
        raise ValueError(f"{where}: field '{name}': empty list")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise ValueError(f"{where}: field '{name}': message {j}: expected a dict with 'role' and 'content', "
                             f"got {type(m).__name__}")
        for key in ("role", "content"):
            value = m.get(key)
            if value is None:
                raise ValueError(f"{where}: field '{name}': message {j}: '{key}' missing")
            if not isinstance(value, str):
                raise ValueError(f"{where}: field '{name}': message {j}: '{key}': expected a string, got "
                                 f"{type(value).__name__}")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{where}: field '{name}': message {j}: '{key}': not valid Unicode (an unpaired "
                                 f"surrogate escape such as \\ud800)") from None
        # None stands for a key this message lacks (datasets stores messages with one set of keys)
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def _conversational(row: Mapping, name: str) -> bool:
    return isinstance(row.get(name), (list, tuple))


# ------------------------------------------------------------------------------------- chat template
def _check_chat_template(tokenizer, where: str, name: str) -> None:
    what = f"{where}: field '{name}' is conversational ({MESSAGES})"
    if tokenizer is None:
        raise ValueError(f"tokenizer: needed to render conversational data with its chat template ({what}); "
                         f"pass tokenizer=")
    if not callable(getattr(tokenizer, "apply_chat_template", None)) or not getattr(tokenizer, "chat_template",
                                                                                     None):
        raise ValueError(f"tokenizer: has no chat template (tokenizer.chat_template is not set), but {what}; "
                         f"give the tokenizer a chat template, or the data in the standard format (strings)")


def _apply_template(tokenizer, messages: list[dict], where: str, name: str, **kw) -> str:
    import jinja2
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **kw)
    except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError) as e:
        raise ValueError(f"{where}: field '{name}': the tokenizer's chat template failed: {e}") from e
    if not isinstance(text, str):
        raise ValueError(f"{where}: field '{name}': the chat template gave {type(text).__name__}, not text")
    return text


def _adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    return isinstance(bos, int) and bos != tokenizer.eos_token_id


def _render_prompt(tokenizer, messages: list[dict], where: str, name: str) -> str:
    # As TRL: a prompt ending with the assistant's message is continued, any other gets the generation prompt.
    kw = {"continue_final_message": True} if messages[-1]["role"] == "assistant" else {"add_generation_prompt": True}
    return _apply_template(tokenizer, messages, where, name, **kw)


def _strip_bos(tokenizer, prompt: str) -> str:
    bos = getattr(tokenizer, "bos_token", None)
    if _adds_bos(tokenizer) and isinstance(bos, str) and bos and prompt.startswith(bos):
        return prompt[len(bos):]        # encode_prompt adds the BOS token itself
    return prompt


def _render_reply(tokenizer, prompt_messages: list[dict], prompt_text: str, reply: list[dict], where: str,
                  name: str) -> str:
    """What rendering prompt + reply adds to the rendered prompt, less a final EOS (the response layout appends
    one, so the model learns to stop where the template ends the turn)."""
    full = _apply_template(tokenizer, prompt_messages + reply, where, name)
    if not full.startswith(prompt_text):
        raise ValueError(f"{where}: field '{name}': the chat template renders the conversation with a start that "
                         f"differs from the prompt rendered alone, so the '{name}' part cannot be cut off exactly "
                         f"(prompt ends {prompt_text[-40:]!r}, the conversation there has "
                         f"{full[:len(prompt_text)][-40:]!r})")
    text = full[len(prompt_text):]
    eos = getattr(tokenizer, "eos_token", None)
    tail = text.rstrip()
    if isinstance(eos, str) and eos and tail.endswith(eos):
        text = tail[:-len(eos)]
    if not text:
        raise ValueError(f"{where}: field '{name}': renders to nothing after the prompt")
    return text


def _render_pair(tokenizer, where, prompt_msgs, prompt_name, replies):
    """(prompt text, [reply texts]) for conversational messages."""
    _check_chat_template(tokenizer, where, prompt_name)
    prompt = _render_prompt(tokenizer, prompt_msgs, where, prompt_name)
    texts = [_render_reply(tokenizer, prompt_msgs, prompt, msgs, where, name) for name, msgs in replies]
    return _strip_bos(tokenizer, prompt), texts


# ------------------------------------------------------------------------------------------- formats
def _sft_rows(rows, tokenizer) -> Iterator[SFTExample]:
    kind = conv = None
    for where, row in rows:
        if kind is None:
            keys = _present(row)
            kind = "prompt" if keys & {"prompt", "completion"} else "messages" if "messages" in keys else \
                "text" if "text" in keys else None
            if kind is None:
                raise ValueError(f"{where}: field 'prompt': missing (an SFT row holds 'prompt' and 'completion', "
                                 f"'text', or 'messages'; it has {sorted(map(str, row))})")
            conv = kind == "messages" or _conversational(row, "prompt" if "prompt" in keys else "completion")
        if kind == "text":
            yield SFTExample("", _nonempty(where, "text", _text(where, row, "text")))
        elif kind == "prompt" and not conv:
            prompt, completion = _text(where, row, "prompt"), _text(where, row, "completion")
            yield SFTExample(prompt, _nonempty(where, "completion", completion))
        elif kind == "prompt":
            prompt, completion = _messages(where, row, "prompt"), _messages(where, row, "completion")
            text, (reply,) = _render_pair(tokenizer, where, prompt, "prompt", [("completion", completion)])
            yield SFTExample(text, reply)
        else:
            messages = _messages(where, row, "messages")
            turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            if not turns:
                raise ValueError(f"{where}: field 'messages': no assistant message to train on")
            if turns[0] == 0:
                raise ValueError(f"{where}: field 'messages': message 0 is the assistant's, with no prompt before it")
            for i in turns:
                text, (reply,) = _render_pair(tokenizer, where, messages[:i], "messages",
                                              [("messages", messages[i:i + 1])])
                yield SFTExample(text, reply)


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _preference_rows(rows, tokenizer) -> Iterator[PreferencePair]:
    explicit = conv = None
    for where, row in rows:
        if explicit is None:
            explicit, conv = "prompt" in _present(row), _conversational(row, "chosen")
        if not conv:
            prompt = _text(where, row, "prompt") if explicit else None
            chosen, rejected = _text(where, row, "chosen"), _text(where, row, "rejected")
            if not explicit:
                k = _common_prefix(chosen, rejected)
                if k and chosen[k - 1] == " ":        # as TRL's extract_prompt: the space starts the responses
                    k -= 1
                prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
                _check_implicit(where, chosen, rejected)
            yield PreferencePair(prompt, _nonempty(where, "chosen", chosen), _nonempty(where, "rejected", rejected))
            continue
        prompt = _messages(where, row, "prompt") if explicit else None
        chosen, rejected = _messages(where, row, "chosen"), _messages(where, row, "rejected")
        if not explicit:
            k = _common_prefix(chosen, rejected)
            if not k:
                raise ValueError(f"{where}: fields 'chosen' and 'rejected' share no first message, so no prompt can "
                                 f"be taken from them; give a 'prompt' field")
            prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
            _check_implicit(where, chosen, rejected)
        text, (c, r) = _render_pair(tokenizer, where, prompt, "prompt" if explicit else "chosen",
                                    [("chosen", chosen), ("rejected", rejected)])
        yield PreferencePair(text, c, r)


def _check_implicit(where: str, chosen, rejected) -> None:
    for name, rest in (("chosen", chosen), ("rejected", rejected)):
        if not rest:
            raise ValueError(f"{where}: field '{name}': nothing is left after the prompt it shares with the other "
                             f"response (chosen and rejected are equal, or one begins the other)")


def _prompt_rows(rows, tokenizer) -> Iterator[tuple[str, dict]]:
    conv = None
    for where, row in rows:
        if conv is None:
            conv = _conversational(row, "prompt")
        if conv:
            messages = _messages(where, row, "prompt")
            _check_chat_template(tokenizer, where, "prompt")
            text = _strip_bos(tokenizer, _render_prompt(tokenizer, messages, where, "prompt"))
        else:
            text = _text(where, row, "prompt")
        yield text, dict(row)


def _collect(items: Iterator, where: str, empty_ok: bool) -> list:
    out = list(items)
    if not out and not empty_ok:
        raise ValueError(f"{where}: no records")
    return out


def _label(source, name: str) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else name


def load_sft_data(source, tokenizer=None, *, name: str = "demonstrations") -> list[SFTExample]:
    """Demonstrations in any SFT format above, from a path, a `datasets.Dataset` or a list of dicts.

    tokenizer: renders conversational rows (needed for those only). name: labels the rows of an in-memory
    source in errors (`name[i]`). Raises ValueError naming the file and line/row (or `name[i]`) and the field of
    the first bad record, or "no records".
    """
    return _collect(_sft_rows(_rows(source, name, paths=True), tokenizer), _label(source, name), False)


def load_preference_data(source, tokenizer=None, *, name: str = "pairs") -> list[PreferencePair]:
    """Preference pairs (explicit or implicit prompt, standard or conversational); as load_sft_data."""
    return _collect(_preference_rows(_rows(source, name, paths=True), tokenizer), _label(source, name), False)


def load_prompt_data(source, tokenizer=None, *, name: str = "prompts") -> PromptData:
    """PPO prompts {prompt} (standard or conversational) with their rows; as load_sft_data."""
    got = _collect(_prompt_rows(_rows(source, name, paths=True), tokenizer), _label(source, name), False)
    return PromptData([t for t, _ in got], [r for _, r in got])


def load_sft_jsonl(path: str | os.PathLike, tokenizer=None) -> list[SFTExample]:
    """load_sft_data for a path (the name predates the other formats; any file kind above is read)."""
    return load_sft_data(path, tokenizer)


def load_preference_jsonl(path: str | os.PathLike, tokenizer=None) -> list[PreferencePair]:
    """load_preference_data for a path."""
    return load_preference_data(path, tokenizer)


def load_prompt_jsonl(path: str | os.PathLike, tokenizer=None) -> list[str]:
    """The prompt strings of load_prompt_data for a path."""
    return load_prompt_data(path, tokenizer).prompts


# The loops' entry points: an argument that must hold data (never a path) in any of the forms above.
def as_sft_examples(demonstrations, tokenizer=None, *, name: str = "demonstrations") -> list[SFTExample]:
    """`demonstrations` (SFTExamples, dicts in any SFT format, or a datasets.Dataset) as a list of SFTExample.

    Empty is allowed. Raises ValueError naming `name` for a str or path (a single text is not a sequence of
    examples), a dict, a set or a non-iterable, and `name[i]` for a bad row."""
    return _collect(_sft_rows(_rows(demonstrations, name, paths=False), tokenizer), name, True)


def as_preference_pairs(pairs, tokenizer=None, *, name: str = "pairs") -> list[PreferencePair]:
    """`pairs` (PreferencePairs, dicts, or a datasets.Dataset) as a list of PreferencePair; as as_sft_examples."""
    return _collect(_preference_rows(_rows(pairs, name, paths=False), tokenizer), name, True)


def as_prompts(prompts, tokenizer=None, *, name: str = "prompts") -> PromptData:
    """`prompts` (strings, {prompt} dicts, a datasets.Dataset, or a PromptData) as PromptData; a plain string
    becomes the row {"prompt": string}. As as_sft_examples: `train_ppo(prompts="1+1=")` is refused, not read as
    four one-character prompts."""
    if isinstance(prompts, PromptData):
        return prompts
    got = _collect(_prompt_rows(_rows(prompts, name, paths=False), tokenizer), name, True)
    return PromptData([t for t, _ in got], [r for _, r in got])


def write_jsonl(path: str | os.PathLike, records: Iterable) -> None:
    """Write dicts or the record dataclasses above as JSONL (atomically)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r if isinstance(r, dict) else r.__dict__, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------- truncation
@dataclass(frozen=True)
class Truncation:
    """What the length limits cut in `rows` records: `prompts` longer than max_prompt_len lose their first
    tokens; `responses` (pairs: chosen or rejected) that do not fit max_len after their prompt lose their last
    tokens, EOS included."""
    rows: int
    prompts: int
    responses: int


def count_truncation(tokenizer, records: Sequence, max_prompt_len: int, max_len: int | None = None) -> Truncation:
    """Count, without cutting, what encode_prompt (max_prompt_len) and collate_sequences (max_len) will cut.

    records: prompt strings, SFTExamples or PreferencePairs (responses are counted only with max_len).
    """
    records = _sequence(records, "records")
    head = 1 if _adds_bos(tokenizer) else 0
    prompts = responses = 0
    for r in records:
        text = r if isinstance(r, str) else r.prompt
        n = head + len(tokenizer.encode(text, add_special_tokens=False))
        prompts += n > max_prompt_len
        if max_len is None or isinstance(r, str):
            continue
        kept = min(n, max_prompt_len)
        replies = (r.completion,) if isinstance(r, SFTExample) else (r.chosen, r.rejected)
        responses += any(kept + len(tokenizer.encode(t, add_special_tokens=False)) + 1 > max_len for t in replies)
    return Truncation(len(records), prompts, responses)


def report_truncation(tokenizer, records: Sequence, max_prompt_len: int, max_len: int | None = None, *,
                      name: str) -> Truncation:
    """count_truncation, and one RuntimeWarning naming `name` and the limits when anything is cut. Call it once
    per run on the whole data (the loops cut batch by batch, silently)."""
    t = count_truncation(tokenizer, records, max_prompt_len, max_len)
    parts = []
    if t.prompts:
        parts.append(f"{t.prompts} of {t.rows} prompts are longer than data.max_prompt_len={max_prompt_len} tokens "
                     f"and lose their first tokens")
    if t.responses:
        parts.append(f"{t.responses} of {t.rows} responses do not fit data.max_len={max_len} tokens after their "
                     f"prompt and lose their last tokens, EOS included")
    if parts:
        warnings.warn(f"{name}: {'; '.join(parts)}", RuntimeWarning, stacklevel=2)
    return t


def _sequence(value, name: str) -> Sequence:
    """`value` as a list, refusing a str/bytes (whose items are characters), a mapping, a set or a non-iterable."""
    if isinstance(value, (str, bytes, bytearray, Mapping, set, frozenset)) or not isinstance(value, Iterable):
        raise ValueError(f"{name}: expected a sequence (a list), got {type(value).__name__}"
                         + (f" {value[:40]!r}" if isinstance(value, str) else ""))
    return list(value)


# ------------------------------------------------------------------------------------- tokenization
def check_tokenizer(tokenizer) -> None:
    """Raise ValueError unless the tokenizer has an int eos and a distinct int pad token."""
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    if not isinstance(eos, int):
        raise ValueError(f"tokenizer.eos_token_id: need an int end-of-sequence id, got {eos!r}")
    if not isinstance(pad, int):
        raise ValueError("tokenizer.pad_token_id: the tokenizer has no pad token; add a distinct one with "
                         "hydra_kernels.rlhf.data.add_pad_token(tokenizer, model) before patching the model")
    if pad == eos:
        raise ValueError(f"tokenizer.pad_token_id: equals eos_token_id ({eos}); pad == eos corrupts reward "
                         "positions and value targets; add a distinct pad token with add_pad_token(tokenizer, model)")


def add_pad_token(tokenizer, model=None, token: str = "<|pad|>") -> int:
    """Give a Hugging Face tokenizer a pad token distinct from eos; resize `model`'s embeddings to match, the
    added rows set to the mean of the others (deterministic: identically seeded runs and resume agree).

    Returns the pad id. Does nothing (but return it) when a distinct pad token already exists.
    """
    pad, eos = getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)
    if isinstance(pad, int) and pad != eos:
        return pad
    if not hasattr(tokenizer, "add_special_tokens"):
        raise ValueError("tokenizer: has no usable pad token and no add_special_tokens(); give it a pad token "
                         "distinct from eos")
    tokenizer.add_special_tokens({"pad_token": token})
    if model is not None:
        n = len(tokenizer)
        old = model.get_input_embeddings().weight.shape[0]
        if old < n:
            # transformers draws the new rows at random (mean_resizing samples around the mean): a run would
            # then differ from an identically seeded one, and its resume digest from its own checkpoint's.
            model.resize_token_embeddings(n, mean_resizing=False)
            _mean_rows_(model, old)
    return tokenizer.pad_token_id


def _mean_rows_(model, old: int) -> None:
    """Set the embedding rows (and output-embedding rows and bias entries, when not tied) from `old` on to the
    mean of the first `old`, computed in fp32: the same added row on every load."""
    import torch
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    tensors = [emb]
    if out is not None and out.weight is not emb:
        tensors.append(out.weight)
    if out is not None and getattr(out, "bias", None) is not None:
        tensors.append(out.bias)
    with torch.no_grad():
        for t in tensors:
            t[old:] = t[:old].float().mean(0).to(t.dtype)


def encode_prompt(tokenizer, text: str, max_prompt_len: int) -> list[int]:
    """[bos] + the last tokens of `text`, max_prompt_len in all (count_truncation counts the prompts cut)."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    head = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    keep = max_prompt_len - len(head)
    if keep < 0:
        raise ValueError(f"max_prompt_len: must leave room for the BOS token, got {max_prompt_len}")
    return head + (ids[-keep:] if keep else [])


def encode_response(tokenizer, text: str) -> list[int]:
    """encode(text) + [eos]."""
    return list(tokenizer.encode(text, add_special_tokens=False)) + [tokenizer.eos_token_id]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, width: int | None = None):
    """(ids [B, W], mask [B, W]) with each row right-aligned."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r) > width:
            raise ValueError(f"rows: row {i} has {len(r)} tokens, more than width {width}")
        if len(r):
            ids[i, width - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


@dataclass
class TokenBatch:
    """Left-padded prompt+response sequences for teacher-forced passes (SFT, reward scoring).

    input_ids, attention_mask, position_ids: [B, T]. loss_mask [B, T]: 1 where the token is a response token
    (the LM loss predicts it from the previous position; prompt and padding never count). A row with an empty
    prompt (no BOS) has no real token before its first response token, so that token is 0 too: it would be
    "predicted" from a padding position, whose hidden state depends on the rest of the batch.
    The last column is every row's last real token.
    """
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    loss_mask: torch.Tensor

    def to(self, device) -> "TokenBatch":
        return TokenBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids,
                                                   self.loss_mask)))


def collate_sequences(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
                      max_len: int | None = None) -> TokenBatch:
    """Concatenate prompt and response token lists, cut responses so the total is ≤ max_len, left-pad."""
    if len(prompts) != len(responses):
        raise ValueError(f"responses: {len(responses)} responses for {len(prompts)} prompts")
    rows, loss_rows = [], []
    for p, r in zip(prompts, responses):
        r = list(r)
        if max_len is not None:
            if len(p) >= max_len:
                raise ValueError(f"max_len: a prompt of {len(p)} tokens leaves no room for a response "
                                 f"(max_len {max_len})")
            r = r[:max_len - len(p)]
        rows.append(list(p) + r)
        loss_rows.append([0] * len(p) + [1 if p or j else 0 for j in range(len(r))])
    ids, mask = left_pad(rows, pad_id)
    loss_mask, _ = left_pad(loss_rows, 0, width=ids.shape[1])
    return TokenBatch(ids, mask, position_ids_from_attention_mask(mask), loss_mask)


def tokenize_sft(tokenizer, examples: Sequence[SFTExample], max_prompt_len: int, max_len: int) -> TokenBatch:
    check_tokenizer(tokenizer)
    examples = _sequence(examples, "examples")
    prompts = [encode_prompt(tokenizer, e.prompt, max_prompt_len) for e in examples]
    responses = [encode_response(tokenizer, e.completion) for e in examples]
    return collate_sequences(prompts, responses, tokenizer.pad_token_id, max_len)


def tokenize_pairs(tokenizer, pairs: Sequence[PreferencePair], max_prompt_len: int,
                   max_len: int) -> tuple[TokenBatch, TokenBatch]:
    """(chosen batch, rejected batch), row i of each from pair i."""
    check_tokenizer(tokenizer)
    pairs = _sequence(pairs, "pairs")
    prompts = [encode_prompt(tokenizer, p.prompt, max_prompt_len) for p in pairs]
    chosen = collate_sequences(prompts, [encode_response(tokenizer, p.chosen) for p in pairs],
                               tokenizer.pad_token_id, max_len)
    rejected = collate_sequences(prompts, [encode_response(tokenizer, p.rejected) for p in pairs],
                                 tokenizer.pad_token_id, max_len)
    return chosen, rejected


def tokenize_prompts(tokenizer, prompts: Sequence[str], max_prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask [B, P] for generation."""
    check_tokenizer(tokenizer)
    rows = [encode_prompt(tokenizer, p, max_prompt_len) for p in _sequence(prompts, "prompts")]
    if any(not r for r in rows):
        raise ValueError("prompts: an empty prompt with no BOS token gives the model nothing to condition on")
    return left_pad(rows, tokenizer.pad_token_id)


__all__ = ["SFTExample", "PreferencePair", "PromptData", "MESSAGES", "load_sft_data", "load_preference_data",
           "load_prompt_data", "check_source", "load_sft_jsonl", "load_preference_jsonl", "load_prompt_jsonl",
           "as_sft_examples", "as_preference_pairs", "as_prompts", "Truncation", "count_truncation",
           "report_truncation", "write_jsonl", "check_tokenizer", "add_pad_token", "encode_prompt", "encode_response",
           "position_ids_from_mask", "left_pad", "TokenBatch", "collate_sequences", "tokenize_sft",
           "tokenize_pairs", "tokenize_prompts"]
