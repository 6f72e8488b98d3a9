"""run.threads: torch's CPU thread count, chosen deliberately: 1 for a tiny model on the CPU (OpenMP's spinning
threads collapse when another process shares the cores), the setting when given, torch's own otherwise."""
import pytest
import torch

from hydra_kernels.rlhf.config import SFTConfig, load_config
from hydra_kernels.rlhf.data import SFTExample
from hydra_kernels.rlhf.sft import hydra_sft
from hydra_kernels.rlhf.threads import TINY_PARAMETERS, choose_threads
from tests.rlhf._tiny import CharTokenizer, tiny_model


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_choose_threads():
    tiny = torch.nn.Linear(4, 4)
    big = torch.nn.Linear(5000, 5000, device="meta")          # 25M parameters, no memory
    assert sum(p.numel() for p in big.parameters()) > TINY_PARAMETERS
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_threads(None, cpu, tiny) == 1
    assert choose_threads(None, cpu, big) is None and choose_threads(None, cuda, tiny) is None
    assert choose_threads(3, cpu, tiny) == 3 and choose_threads(3, cuda, big) == 3


def test_sft_sets_one_thread_for_a_tiny_model_unless_told(tmp_path, threads):
    tok = CharTokenizer()
    demos = [SFTExample("1+1=", "2")] * 4
    torch.set_num_threads(2)
    seen = []

    def run(*extra):
        cfg = load_config(SFTConfig, None, ["epochs=1", "batch_size=4", "run.progress=false", "run.device=cpu",
                                            f"run.output_dir={tmp_path / str(len(seen))}", *extra])
        hydra_sft(tiny_model(len(tok)), tok, demos, [], cfg, callback=lambda e, m: seen.append(
            torch.get_num_threads()))
    run()
    run("run.threads=2")
    assert seen == [1, 2]
    with pytest.raises(ValueError, match="run.threads"):
        load_config(SFTConfig, None, ["run.threads=0"])


def test_the_demo_passes_threads_to_every_stage():
    from hydra_kernels.rlhf.demo.run import _finalise, quick_config
    cfg = quick_config()
    cfg.threads = 2
    done = _finalise(cfg)
    assert done.sft.run.threads == done.ppo.run.threads == done.grpo.run.threads == 2
    assert _finalise(quick_config()).sft.run.threads is None
