"""bench.profiles: warp-stall summaries of Nsight Compute source pages (CPU: recorded and synthetic files)."""
import gzip
import os

import pytest

from nvfp4lib.bench import harness, profiles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_stall_summary_of_a_synthetic_page(tmp_path):
    page = ('==PROF== Connected\n"Kernel Name","k1",\n'
            '"Address","Source","Warp Stall Sampling (All Samples)","stall_long_sb","stall_wait","stall_long_sb (Not Issued)"\n'
            '"0x10","HMMA.16816 R4, R12, R16, R4","30","27","3","20"\n'
            '"0x20","LDG.E.128 R16","10","0","10","0"\n')
    path = tmp_path / "p.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write(page)
    (kernel,) = profiles.stall_summary(str(path), top=1)
    assert kernel["kernel"] == "k1" and kernel["samples"] == 40
    assert kernel["shares"] == {"long_sb": 27 / 40, "wait": 13 / 40}  # not-issued columns are a subset, not added
    assert kernel["top"] == [dict(address="0x10", sass="HMMA.16816 R4, R12, R16, R4", samples=30.0, reason="long_sb")]
    (tmp_path / "empty.csv").write_text("no table here\n")
    with pytest.raises(ValueError, match="source-page"):
        profiles.stall_summary(str(tmp_path / "empty.csv"))


def test_recorded_m16_profiles_show_the_load_waits():
    """The recorded H100 profiles behind gemm_decode.wide_registers: long-scoreboard waits at an MMA lead
    both; the 80-register plan (one kernel) waits more than the wide one (gate_up and down, two launches each)."""
    capped = profiles.stall_summary(os.path.join(ROOT, "data/profiles/ncu_source_gate_up_m16_nvidia_h100_80gb_hbm3_724e57e.csv.gz"))
    wide = profiles.stall_summary(os.path.join(ROOT, "data/profiles/ncu_source_wide_m16_nvidia_h100_80gb_hbm3_a5f19e8.csv.gz"))
    assert len(capped) == 1 and len(wide) == 4
    for kernel in capped + wide:
        assert next(iter(kernel["shares"])) == "long_sb" and kernel["top"][0]["sass"].startswith("HMMA")
    assert capped[0]["shares"]["long_sb"] > 0.65 > max(k["shares"]["long_sb"] for k in wide)


def test_parse_kwargs():
    assert harness.parse_kwargs(["tiles=2", "pdl=start", "ctas_per_sm=None", "stream_loads=False", "ksplit=-1"]) == dict(
        tiles=2, pdl="start", ctas_per_sm=None, stream_loads=False, ksplit=-1)
