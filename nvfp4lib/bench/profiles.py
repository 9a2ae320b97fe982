"""Recorded Nsight Compute profiles (``data/profiles/``): warp-stall summaries of the source page.

The input is what ``ncu ... --page source --print-source sass --csv`` prints, gzipped or not: per profiled
kernel a ``"Kernel Name",<name>`` line, then a table with one line per SASS instruction (``Address``,
``Source``, ``Warp Stall Sampling (All Samples)`` and one ``stall_<reason>`` column per stall reason).
"""
from __future__ import annotations

import csv
import gzip
import io
from typing import List

SAMPLES = "Warp Stall Sampling (All Samples)"


def _read(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return f.read()


def stall_summary(path: str, top: int = 5) -> List[dict]:
    """One dict per profiled kernel: ``kernel`` (its name), ``samples`` (all warp-stall samples), ``shares``
    ({stall reason: fraction of the samples}, issued and not-issued samples together, largest first) and
    ``top`` (the ``top`` instructions by samples: address, SASS text, samples, their main stall reason).
    Raises ValueError when the file holds no source-page table."""
    text = _read(path)
    kernels = []
    for part in text.split('"Kernel Name",')[1:]:
        name = next(csv.reader(io.StringIO(part.splitlines()[0])))[0]
        start = part.find('"Address","Source"')
        if start < 0:
            continue
        rows = list(csv.reader(io.StringIO(part[start:])))
        header = rows[0]
        body = [r for r in rows[1:] if len(r) == len(header)]
        col = {h: i for i, h in enumerate(header)}
        reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]

        def number(row, key):
            return float(row[col[key]] or 0)

        samples = sum(number(r, SAMPLES) for r in body)
        totals = {h[len("stall_"):]: sum(number(r, h) for r in body) for h in reasons}
        shares = {k: v / samples for k, v in sorted(totals.items(), key=lambda kv: -kv[1]) if v} if samples else {}
        ranked = sorted(body, key=lambda r: -number(r, SAMPLES))[:top]
        kernels.append(dict(kernel=name, samples=samples, shares=shares, top=[
            dict(address=r[col["Address"]], sass=r[col["Source"]].strip(), samples=number(r, SAMPLES),
                 reason=max(reasons, key=lambda h: number(r, h))[len("stall_"):]) for r in ranked]))
    if not kernels:
        raise ValueError(f"{path}: no Nsight Compute source-page table (run ncu with --page source --csv)")
    return kernels
