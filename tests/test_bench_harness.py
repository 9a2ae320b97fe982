"""The recorded-result helpers of bench.harness (CPU: no timing, only what a result file holds)."""
import json

import pytest

from nvfp4lib.bench import harness


def test_write_probe_records_metadata_fields_and_notes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setenv("NVFP4LIB_COMMIT", "abc1234")
    path = harness.write_probe("some_probe", "a method", notes=["one note"], rows=[{"m": 1}], copy_GBps=3000.0)
    assert path == str(tmp_path / "some_probe.json")
    data = json.loads((tmp_path / "some_probe.json").read_text())
    assert data["method"] == "a method" and data["commit"] == "abc1234" and data["device"]
    assert data["rows"] == [{"m": 1}] and data["notes"] == ["one note"] and data["copy_GBps"] == 3000.0
    assert "1 notes" in capsys.readouterr().out
    loaded = harness.load_recorded(path)
    assert "commit abc1234" in loaded["label"]


def test_write_result_refuses_a_result_without_provenance(tmp_path):
    with pytest.raises(ValueError, match="commit"):
        harness.write_result(str(tmp_path / "x.json"), {"device": "cpu", "date": "d", "method": "m"})


def test_time_decode_variants_checks_before_timing(monkeypatch):
    """bench.gemm.time_decode_variants (the GPU probes' loop), on CPU with the launch and the timer replaced:
    a variant is timed only after its first call matched the reference; a wrong one leaves a note, no time."""
    import types

    import torch

    from nvfp4lib.bench import gemm as gemm_bench
    from nvfp4lib.kernels.sm90 import gemm_decode

    ref = torch.randn(2, 32)
    monkeypatch.setattr(gemm_decode, "run_decode", lambda x, w, s, a, n, swiglu_limit=None, wrong=False: ref * (-1 if wrong else 1))
    monkeypatch.setattr(harness, "time_safely", lambda fns, notes, label: (float(len(fns)), "graph"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    weights = [types.SimpleNamespace(weight=None, block_scale=None, alpha=None)] * 4
    notes = []
    row = gemm_bench.time_decode_variants({}, [("default", {}), ("bad", dict(wrong=True))], None, weights, ref, 32, None, notes,
                                          "case", keep_error=True)
    assert row == {"default_rel_err": 0.0, "default_us": 4.0}
    assert len(notes) == 1 and notes[0].startswith("case bad: WRONG")
