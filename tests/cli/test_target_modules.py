"""lora.target_modules on the command line: a name list written as `q_proj,v_proj` or a single name.

A bad value is refused by the config before any model is loaded, naming lora.target_modules and showing the
list syntax.
"""
import pytest

from hydra_kernels import rlhf
from tests.cli._local import SFT_SMALL, assert_one_line_error, cli


@pytest.mark.parametrize("value", ["q_proj,v_proj", "q_proj", "all_linear"])
def test_a_string_other_than_all_linear_is_refused_by_the_config(value):
    for cls in (rlhf.SFTConfig, rlhf.PPOConfig):
        with pytest.raises(ValueError, match=r"lora\.target_modules: .*\[q_proj,v_proj\]"):
            rlhf.load_config(cls, None, [f"lora.target_modules={value}"])
    assert rlhf.load_config(rlhf.SFTConfig, None, ["lora.target_modules=[q_proj]"]).lora.target_modules == ["q_proj"]
    assert rlhf.load_config(rlhf.SFTConfig, None, ["lora.target_modules=all-linear"]).lora.target_modules == "all-linear"


def test_cli_refuses_before_loading_anything(tmp_path):
    proc = cli("sft", f"model.path={tmp_path / 'not_loaded'}", f"data.sft_path={tmp_path / 'not_read.jsonl'}",
               "mode=lora", "lora.target_modules=q_proj,v_proj", *SFT_SMALL)
    assert_one_line_error(proc, "lora.target_modules", "[q_proj,v_proj]")
