"""Every notebook is committed without outputs and has a cell tagged `parameters` with the standard knobs."""
import glob
import json
import os

import pytest

NOTEBOOKS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "notebooks", "[0-9]*.ipynb")))


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_has_no_outputs_and_a_parameters_cell(path):
    with open(path) as f:
        nb = json.load(f)
    code_cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    dirty = [i for i, c in enumerate(code_cells) if c.get("outputs") or c.get("execution_count")]
    assert not dirty, f"code cells {dirty} carry outputs: strip them before committing"
    tagged = [c for c in code_cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell must be tagged `parameters`"
    source = "".join(tagged[0]["source"])
    for knob in ("device", "full_size", "seed"):
        assert f"{knob} =" in source, f"the parameters cell must set `{knob}`"
