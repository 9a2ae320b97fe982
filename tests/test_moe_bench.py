"""The MoE benchmark's CPU dry run: every case runs, is checked against fp32, and records no time."""
import json

import pytest
import torch

from nvfp4lib.bench import moe as moe_bench


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the benchmark would time for real (this is the CPU dry run)")
def test_moe_bench_dry_run_records_correct_cases_without_times(tmp_path, fresh_seed):
    out = tmp_path / "moe.json"
    assert moe_bench.main(["--small", "--decode-tokens", "1,8", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["method"].startswith("CPU dry run")
    assert [(r["case"], r["tokens"]) for r in result["rows"]] == [("decode", 1), ("decode", 8), ("prefill", 64)]
    for row in result["rows"]:
        assert row["cosine"] >= 0.9999 and row["rel_err"] <= 1e-2
        assert row["time_us"] is None and row["cublas_bf16_us"] is None and row["target_met"] is None
        assert 0 < row["experts_touched"] <= 8 and row["bytes"] > 0


def test_touched_bytes_count_only_routed_experts():
    weights = moe_bench.random_experts(4, 64, 32, "cpu", segments=2)
    down = moe_bench.random_experts(4, 32, 32, "cpu")
    both = moe_bench.moe.MoEWeights(weights, down)
    per_expert = weights.nbytes // 4 + down.nbytes // 4
    assert moe_bench.touched_bytes(both, [3, 0, 0, 1]) == 2 * per_expert
