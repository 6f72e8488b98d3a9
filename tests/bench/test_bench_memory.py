"""bench/bench_memory.py: the ledger counts a known allocation sequence exactly (views and dead tensors
included), models attention as flash attention (no [T, T] tensor), counts the library ops' temporaries, answers
data-dependent reads; at tiny shapes Hydra-PPO's fixed bytes are below LoRA-PPO's and the TRL-style layout's; the max-batch arithmetic and
the MET / MISSED decisions; the report renders."""
import gc

import pytest
import torch

from tests.bench._load import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("bench_memory")


def test_ledger_is_exact_on_a_known_sequence(bench):
    meta = torch.device("meta")
    ledger = bench.Ledger()
    with ledger:
        a = torch.empty(1000, device=meta)                     # 4000 bytes
        b = torch.empty(250, dtype=torch.float64, device=meta)  # 2000
        v = a[10:20].view(2, 5)                                # a view: no new storage
        assert ledger.live_bytes == 6000
        c = a * 2                                              # 4000 more
        assert ledger.live_bytes == 10000
        del a
        gc.collect()
        assert ledger.live_bytes == 10000                      # the view keeps a's storage alive
        del v
        gc.collect()
        assert ledger.live_bytes == 6000
        ledger.reset()
        d = torch.empty(500, dtype=torch.bfloat16, device=meta)  # 1000
        del d
        gc.collect()
        assert ledger.peak()["peak_bytes"] == 7000
        del b, c
        gc.collect()
        assert ledger.live_bytes == 0
        # autograd: what backward saves and its temporaries are counted, and freed with the graph
        x = torch.empty(256, 256, device=meta, requires_grad=True)
        ledger.reset()
        (x @ x).sum().backward()
        assert ledger.peak()["peak_bytes"] >= 3 * 256 * 256 * 4     # x, the product, the grad
        del x
        gc.collect()
        assert ledger.live_bytes == 0


def test_data_dependent_reads(bench):
    state = {"v": False}
    ledger = bench.Ledger(lambda: state["v"])
    with ledger:
        t = torch.empty(4, device="meta")
        assert bool(torch.isfinite(t).all()) is False
        state["v"] = True
        assert bool(torch.isfinite(t).all()) is True
        assert bool((t > 0).any()) is False                     # any(): never a bad token, never non-finite
        assert torch.empty(3, dtype=torch.long, device="meta").tolist() == [0, 0, 0]


def test_attention_is_modelled_as_flash(bench):
    B, H, T, D = 2, 4, 512, 16
    ledger = bench.Ledger()
    with ledger:
        q = torch.empty(B, H, T, D, device="meta", requires_grad=True)
        out, _ = bench.flash_shape_attention(None, q, q, q, None)
        assert out.shape == (B, T, H, D)
        out.sum().backward()
    assert ledger.peak()["peak_bytes"] < B * H * T * T * 4 / 4     # far below one fp32 [T, T] score matrix
    with pytest.raises(ValueError, match="query"):
        bench.flash_shape_attention(None, torch.zeros(1, 1, 2, 2), None, None, None)


@pytest.mark.skipif(not hasattr(torch.library, "get_kernel"), reason="torch.library.get_kernel: torch >= 2.9")
def test_library_ops_count_their_temporaries(bench):
    from hydra_kernels import ops
    T, V, D = 64, 1000, 32
    ledger = bench.Ledger()
    with ledger:
        h = torch.empty(T, D, device="meta", requires_grad=True)
        w = torch.empty(V, D, device="meta")
        tg = torch.zeros(T, dtype=torch.long, device="meta")
        ledger.reset()
        logp, _, _ = ops.linear_logprobs(h, w, tg)
        fwd = ledger.peak()["peak_bytes"] - ledger.live_bytes
        logp.sum().backward()
        bwd = ledger.peak()["peak_bytes"]
    # The torch backend forms the [T, V] fp32 logits in chunks; a fake kernel would allocate the [T] outputs only.
    assert fwd >= T * V * 4 and bwd >= T * V * 4, (fwd, bwd)


@pytest.fixture(scope="module")
def tiny_rows(bench):
    spec = dict(model="tiny", ckpt=False, dtype="float32", lora_r=8, prompt_len=8, response_len=4)
    # tiny has 2 layers: depths (1, 2) end at its own depth; small batches keep the sampling loop short
    return {lay: bench.fit_row(dict(spec, layout=lay), batches=(1, 2, 3, 4), depths=(1, 2))
            for lay in ("hydra", "lora", "trl-style")}


def test_one_base_holds_less_than_four_or_three(bench, tiny_rows):
    h, lo, t = tiny_rows["hydra"], tiny_rows["lora"], tiny_rows["trl-style"]
    assert 0 < h["weights_bytes"] < t["weights_bytes"] < lo["weights_bytes"]
    assert h["fixed_bytes"] < t["fixed_bytes"] < lo["fixed_bytes"]
    for r in tiny_rows.values():
        for ph in bench.PHASES:
            assert r[f"{ph}_per_sample_bytes"] > 0 and r[f"{ph}_fixed_bytes"] >= r["weights_bytes"]
        assert r["optimizer_state_bytes"] > 0


def test_gpu_check_runs_its_code_on_the_cpu(bench):
    """The GPU run's check (a real step vs the ledger) runs where no GPU exists, on the CPU's probe."""
    spec = dict(bench.GPU_CHECK, model="tiny", dtype="float32", lora_r=4, prompt_len=8, response_len=4, batch=2)
    out = bench.gpu_check(spec, device="cpu")
    assert set(out["real_peak_mib"]) == set(out["ledger_peak_mib"]) == set(bench.PHASES)
    assert all(v > 0 for v in out["ledger_peak_mib"].values()) and out["ledger_over_real"] > 0


def test_depth_extrapolation_matches_a_full_depth_run(bench, monkeypatch):
    monkeypatch.setitem(bench.bpv.MODELS, "tiny-4", dict(bench.bpv.MODELS["tiny"], num_hidden_layers=4))
    spec = dict(model="tiny-4", layout="hydra", ckpt=True, dtype="float32", lora_r=8, prompt_len=8, response_len=4)
    row = bench.fit_row(spec, batches=(1, 2, 3, 4), depths=(2, 3))
    chk = bench.check_depth(spec, row, batch=1)
    for ph in bench.PHASES:
        assert chk[f"{ph}_extrapolated_over_full"] == pytest.approx(1.0, rel=1e-6), ph


def test_max_batch_and_targets(bench):
    # update: the optimizer-step moment (30 GB + 0.1 GB a sample) vs the backward (21 GB + 6 GB a sample)
    row = {"rollout_lines": [[20e9, 1e9], [20e9, 1e9]], "score_lines": [[20e9, 0.5e9], [20e9, 0.5e9]],
           "update_lines": [[30e9, 0.1e9], [21e9, 6e9]]}
    assert bench.max_batch(row, 80e9) == 9                      # (80 - 21) / 6
    assert bench.max_batch(row, 30.5e9) == 1                    # the flat moment decides at small batches
    assert bench.max_batch(dict(row, update_lines=[[81e9, 0.0]]), 80e9) == 0

    def r(mb, upd):
        return {"max_batch_80gb": mb, "update_per_sample_bytes": upd}
    res = {"ledger": {"llama-7b": {"hydra/off": r(10, 4e9), "hydra/on": r(21, 2e9), "lora/off": r(3, 9e9),
                                   "lora/on": r(4, 3e9), "trl-style/off": r(3, 9e9), "trl-style/on": r(6, 3e9)}}}
    t = {x["id"]: x for x in bench.targets(res)}
    assert t["memory.batch_vs_lora"]["ok"] and t["memory.batch_vs_trl"]["ok"]          # 21 >= 5x4, >= 3x6
    assert t["memory.per_sample_vs_trl"]["ok"] and not t["memory.per_sample_vs_trl.ckpt"]["ok"]
    res["ledger"]["llama-7b"]["lora/on"] = r(6, 3e9)
    assert not {x["id"]: x for x in bench.targets(res)}["memory.batch_vs_lora"]["ok"]   # 21 < 30


def test_max_batch_is_corrected_by_ledger_runs(bench, monkeypatch):
    # A concave step peak (8 GB a sample first, 6 later): the fitted answer 4 is too small, 5 fits, 6 does not.
    peaks = {1: 50, 2: 58, 3: 65, 4: 71, 5: 77, 6: 83, 7: 89}
    monkeypatch.setattr(bench, "depth_peaks", lambda spec, n, depths: {
        f"peak_{ph}_bytes": peaks[n] * 1e9 if ph == "update" else 1.0 for ph in bench.PHASES})
    row = {"max_batch_80gb": 4}
    bench.verify_max_batch({}, row, 80)
    assert row["max_batch_80gb"] == 5 and row["verify"]["fitted"] == 4 and not row["verify"]["ok"]
    row = {"max_batch_80gb": 7}
    bench.verify_max_batch({}, row, 80)
    assert row["max_batch_80gb"] == 5 and set(row["verify"]["step_peak_bytes"]) == {"7", "6", "5"}
    row = {"max_batch_80gb": 5}
    bench.verify_max_batch({}, row, 80)
    assert row["max_batch_80gb"] == 5 and row["verify"]["ok"]


def test_report_renders(bench, tiny_rows):
    res = {"meta": {"date": "2026-01-01T00:00:00+00:00", "machine": "m", "versions": {"torch": torch.__version__},
                    "commit": None, "command": "python bench/bench_memory.py --quick"},
           "settings": dict(bench.QUICK), "ledger": {"tiny": {f"{k}/off": v for k, v in tiny_rows.items()}}}
    res["targets"] = bench.targets(res)
    md = bench.markdown(res)
    assert "| tiny | Hydra-PPO |" in md and "TRL-style (peft)" in md and "## Targets" in md


def test_readme_block_is_rewritten_in_place(bench, tiny_rows, tmp_path):
    res = {"meta": {"date": "2026-01-01T00:00:00+00:00"}, "settings": dict(bench.QUICK),
           "ledger": {"tiny": {f"{k}/on": v for k, v in tiny_rows.items()}}}
    js = tmp_path / "r.json"
    js.write_text(__import__("json").dumps(res))
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{bench.README_START}\nold table\n{bench.README_END}\nafter\n")
    bench.update_readme(str(js), readme)
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old table" not in text
    assert "| tiny | Hydra-PPO |" in text and text.count(bench.README_START) == 1
    readme.write_text("no block\n")
    with pytest.raises(ValueError, match="readme"):
        bench.update_readme(str(js), readme)
