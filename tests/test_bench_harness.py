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
