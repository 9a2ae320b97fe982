"""Run notebooks headlessly as a regression suite: papermill executes each one into --out, then nbconvert
renders it to a self-contained HTML report. Every notebook runs even if an earlier one fails; the exit
status is 1 if any failed, and each failure is named with its cell.

Usage: python scripts/run_notebooks.py --out reports [-p name value ...] notebooks/01_x.ipynb ...
Parameters (-p) go to each notebook's cell tagged `parameters` (values parsed as Python literals).
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
import time


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def failing_cell(output_path: str) -> str:
    """The first cell of an executed notebook whose outputs hold an error, as 'cell N: Error: message'."""
    import nbformat

    nb = nbformat.read(output_path, as_version=4)
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                first_line = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
                return f"cell {index} ({first_line[:60]!r}): {output.get('ename')}: {output.get('evalue')}"
    return "unknown cell"


def render_html(executed: str, html: str) -> bool:
    """Render the executed notebook to self-contained HTML; False (and a note) where nbconvert is missing,
    as on a GPU host that only has papermill."""
    import nbformat

    try:
        from nbconvert import HTMLExporter
    except ImportError:
        print(f"[run-notebooks] nbconvert is not installed: no HTML for {executed}", flush=True)
        return False

    body, _ = HTMLExporter(embed_images=True).from_notebook_node(nbformat.read(executed, as_version=4))
    with open(html, "w", encoding="utf-8") as f:
        f.write(body)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="+")
    parser.add_argument("--out", default="reports")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    args = parser.parse_args()

    import papermill

    os.makedirs(args.out, exist_ok=True)  # papermill does not create it
    parameters = {name: parse_value(value) for name, value in args.parameter}
    failures = []
    for notebook in args.notebooks:
        name = os.path.splitext(os.path.basename(notebook))[0]
        executed = os.path.join(args.out, f"{name}.ipynb")
        start = time.time()
        print(f"[run-notebooks] {name} ...", flush=True)
        try:
            papermill.execute_notebook(
                notebook, executed, parameters=parameters, kernel_name="python3", language="python",
                cwd=os.path.dirname(os.path.abspath(notebook)), execution_timeout=args.timeout, progress_bar=False,
            )
            status = "ok"
        except Exception as error:  # PapermillExecutionError, or the kernel died
            where = failing_cell(executed) if os.path.exists(executed) else str(error).splitlines()[0]
            failures.append(f"{notebook}: {where}")
            status = f"FAILED at {where}"
        if os.path.exists(executed):
            render_html(executed, os.path.join(args.out, f"{name}.html"))
        print(f"[run-notebooks] {name}: {status} ({time.time() - start:.0f} s)", flush=True)
    if failures:
        print("\n[run-notebooks] failing notebooks:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print(f"[run-notebooks] all {len(args.notebooks)} notebooks passed; reports in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
