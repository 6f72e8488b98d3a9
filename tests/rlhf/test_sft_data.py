"""Review: JSONL loaders on encodings. A bad record must raise ValueError("<file>:<line>: ..."), as for
every other bad record: invalid UTF-8 raised a bare UnicodeDecodeError naming neither the file nor the line
(a byte offset in a read buffer instead); a JSON-escaped lone surrogate ("\\ud800") loaded and failed later
wherever the text is encoded. A UTF-8 byte-order mark (Windows editors write one) is accepted. Unicode text,
CRLF line ends, blank lines, extra fields and an empty prompt load as they are."""
import pytest

from hydra_kernels.rlhf.data import SFTExample, load_preference_jsonl, load_sft_jsonl


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n\n{"prompt": "\xff", "completion": "b"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:3: not valid UTF-8"):
        load_sft_jsonl(path)


def test_lone_surrogate_names_file_line_and_field(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "\\ud800"}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:1: field 'rejected': "):
        load_preference_jsonl(path)


def test_bom_unicode_crlf_blank_lines_and_extra_fields(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes('\ufeff{"prompt": "café 😀", "completion": "\\u00e9\\ud83d\\ude00", "x": {"y": [1]}}\r\n'
                     '\r\n   \n{"prompt": "", "completion": "z"}'.encode("utf-8"))
    assert load_sft_jsonl(path) == [SFTExample("café 😀", "é😀"), SFTExample("", "z")]
