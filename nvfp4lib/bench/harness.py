"""The shared measuring method (GPU only; everything here needs CUDA).

- :func:`copy_bandwidth`: device-to-device copy of 1 GiB, bytes read + written per second.
- :func:`time_graph`: capture callables (one per rotating weight set, so the 50 MB L2 cannot hold the
  weights) into one CUDA graph, replay it many times, return the median time per call.
- :func:`hbm_floor_us`: bytes over the measured bandwidth.
- :func:`run_metadata` / :func:`write_result`: device, date, commit and method of a recorded result.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import statistics
import subprocess
from typing import Callable, List, Optional, Sequence, Tuple

import torch


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Measured device copy bandwidth in bytes/s, counting bytes read plus written (median of 20)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for i in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 5:
            times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def time_graph(fns: Sequence[Callable[[], object]], reps_in_graph: int = 3, replays: int = 50, warmup: int = 5) -> float:
    """Median microseconds per call of ``fns`` (rotating weight sets) under CUDA-graph replay.

    Every callable is run once eagerly on a side stream (compilation, workspace allocation), then the
    sequence ``fns * reps_in_graph`` is captured into one graph; each replay is timed with CUDA events.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps_in_graph):
            for fn in fns:
                fn()
    for _ in range(warmup):
        graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times) / (reps_in_graph * len(fns))


def time_eager(fns: Sequence[Callable[[], object]], replays: int = 50) -> float:
    """Median microseconds per call of ``fns`` (rotating) timed one call at a time with CUDA events,
    for code that cannot be captured in a CUDA graph (it includes the launch overhead)."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    times = []
    for i in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fns[i % len(fns)]()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def time_safely(fns: Sequence[Callable[[], object]], notes: List[str], label: str, reps_in_graph: int = 3, replays: int = 50,
                eager_fallback: bool = False) -> Tuple[Optional[float], Optional[str]]:
    """(microseconds, "graph" | "eager") for ``fns``, or (None, None) without CUDA.

    A failure is appended to ``notes`` (prefixed with ``label``) instead of raising, so one bad case does
    not lose the rest of a benchmark run; with ``eager_fallback`` a failed graph capture is retimed eagerly.
    """
    if not torch.cuda.is_available():
        return None, None
    try:
        return time_graph(fns, reps_in_graph=reps_in_graph, replays=replays), "graph"
    except Exception as error:  # noqa: BLE001 - recorded in the result, the run goes on
        notes.append(f"{label}: graph capture failed ({type(error).__name__}: {str(error)[:200]})" + ("; eager timing" if eager_fallback else ""))
        torch.cuda.synchronize()
    if not eager_fallback:
        return None, None
    try:
        return time_eager(fns, replays), "eager"
    except Exception as error:  # noqa: BLE001
        notes.append(f"{label}: eager run failed ({type(error).__name__}: {str(error)[:200]})")
        return None, None


def hbm_floor_us(nbytes: float, bandwidth: float) -> float:
    """The time to move ``nbytes`` at ``bandwidth`` bytes/s, in microseconds."""
    return nbytes / bandwidth * 1e6


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error ||out - ref|| / ||ref|| in fp32 (NaN anywhere gives NaN)."""
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm())


def cosine(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float().flatten(), ref.float().flatten()
    return float(torch.dot(out, ref) / (out.norm() * ref.norm()))


def device_slug() -> str:
    """The GPU's name as a file-name part ("nvidia_h100_80gb_hbm3"), "cpu" without CUDA."""
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def parse_kwargs(options) -> dict:
    """Keyword arguments from ``["key=value", ...]`` as the GPU probes take them from the environment: ints,
    the words True / False / None, else the string."""
    words = {"True": True, "False": False, "None": None}

    def value(text: str):
        return words[text] if text in words else int(text) if text.lstrip("-").isdigit() else text

    return {key: value(text) for key, text in (option.split("=", 1) for option in options)}


def fmt(value, spec: str = ".1f") -> str:
    """A number for a results table, "-" for a missing one."""
    return "-" if value is None else format(value, spec)


def git_commit() -> str:
    """The commit of the working tree (``+dirty`` when it has changes); "unknown" outside git.
    ``NVFP4LIB_COMMIT`` wins when set: the GPU host's copy of the tree may carry a stale ``.git``."""
    if os.environ.get("NVFP4LIB_COMMIT"):
        return os.environ["NVFP4LIB_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_metadata(method: str) -> dict:
    """Device, date, commit, software and method of a measurement."""
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "method": method,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        meta.update(device=props.name, sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
    else:
        meta["device"] = "cpu"
    return meta


def write_result(path: str, payload: dict) -> str:
    """Write ``payload`` (which must hold run_metadata's keys) as indented JSON; returns the path."""
    missing = {"device", "date", "commit", "method"} - payload.keys()
    if missing:
        raise ValueError(f"a recorded result needs {sorted(missing)}")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    return path


def write_probe(name: str, method: str, notes: Optional[List[str]] = None, **fields) -> str:
    """A GPU probe's result: run_metadata(method) plus ``fields`` (and ``notes`` when given) as
    ``$OUT/<name>.json``; prints the note count and the first 20 notes. Returns the path."""
    payload = run_metadata(method)
    payload.update(fields)
    if notes is not None:
        payload["notes"] = notes
    path = write_result(os.path.join(os.environ.get("OUT", "/tmp/out"), f"{name}.json"), payload)
    if notes is not None:
        print(f"{len(notes)} notes", *notes[:20], sep="\n")
    return path


def load_recorded(path: str) -> dict:
    """Read a recorded result and return it with a ``label`` saying where and when it was measured."""
    with open(path) as f:
        data = json.load(f)
    data["label"] = f"recorded on {data.get('device', '?')}, {data.get('date', '?')[:10]}, commit {data.get('commit', '?')}"
    return data
