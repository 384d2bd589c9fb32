"""Every notebook in notebooks/ executes headlessly (nbclient, kernel python3) on a small budget.

The notebooks read VARSTUDY_NB_SMALL=1 in their parameters cell: tiny batches, few Monte Carlo
draws, and figures written to VARSTUDY_NB_OUT instead of figures/; a notebook leaves nothing in
its temporary folder and prints no TqdmWarning.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
TIMEOUT_S = 180  # per cell


def test_notebooks_found():
    assert {p.name for p in NOTEBOOKS} >= {"variance_vs_ratio.ipynb", "reproduce_figures.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import tempfile

    monkeypatch.setenv("VARSTUDY_NB_SMALL", "1")
    monkeypatch.setenv("VARSTUDY_NB_OUT", str(tmp_path / "figures"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # what a notebook leaves in its tempdir
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        f"{path.name} is committed with outputs; clear them"
    client = NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError with the failing cell and traceback
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.get("output_type") == "error"]
    assert not errors
    left = [p.name for p in (tmp_path / "tmp").iterdir()
            if not p.name.startswith("torchinductor_")]  # torch's own compile cache
    assert not left, f"the notebook left temporary files behind: {left}"
    warned = [o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.get("name") == "stderr"]
    assert not any("TqdmWarning" in w for w in warned), warned


# The executed copies that the documentation site renders (docs/notebooks.md) ---------------------

RENDERED = Path(__file__).resolve().parent.parent / "docs" / "notebooks"
RERUN = "python -m analysis.render_notebooks"


def _cells(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source) for c in nb.cells
            if "rendered-note" not in c.metadata.get("tags", [])]  # the copy's added note


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_rendered_copy_is_current(path: Path):
    """docs/notebooks/<name>.ipynb exists, has outputs, and holds the notebook's cells as they
    are now (a stale copy fails: rerun the command and commit it)."""
    copy = RENDERED / path.name
    rerun = f"rerun `{RERUN} {path.stem}` and commit docs/notebooks/{path.name}"
    assert copy.is_file() and not copy.is_symlink(), f"docs/notebooks/{path.name} missing; {rerun}"
    rendered = nbformat.read(copy, as_version=4)
    assert _cells(rendered) == _cells(nbformat.read(path, as_version=4)), \
        f"docs/notebooks/{path.name} is stale (its cells differ from notebooks/{path.name}); {rerun}"
    assert sum("rendered-note" in c.metadata.get("tags", []) for c in rendered.cells) == 1, rerun
    code = [c for c in rendered.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), f"a cell was not executed; {rerun}"
    assert any(c.get("outputs") for c in code), f"docs/notebooks/{path.name} has no outputs; {rerun}"
    assert not [o for c in code for o in c.outputs if o.get("output_type") == "error"], rerun


def test_no_rendered_copy_without_its_notebook():
    orphans = sorted({p.name for p in RENDERED.iterdir()} - {p.name for p in NOTEBOOKS})
    assert not orphans, f"docs/notebooks/ holds {orphans} with no notebook in notebooks/; remove them"
