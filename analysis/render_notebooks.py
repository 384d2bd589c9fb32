"""Render the notebooks for the documentation site: execute each ``notebooks/*.ipynb`` headlessly
on the small budget and write the executed copy, outputs included, to ``docs/notebooks/``.

    python -m analysis.render_notebooks [NAME ...]

The notebooks are committed without outputs (``tests/test_notebooks.py``); the site renders the
executed copies under ``docs/notebooks/`` and never runs anything itself (``nb_execution_mode =
"off"`` in ``docs/conf.py``). Each notebook runs exactly as ``tests/test_notebooks.py`` runs it:
nbclient, kernel ``python3``, cell timeout 180 s, working directory ``notebooks/``, with
``VARSTUDY_NB_SMALL=1`` (tiny models and batches, few Monte Carlo draws), ``VARSTUDY_NB_OUT`` and
``TMPDIR`` in a temporary folder (deleted afterwards), ``MPLBACKEND=Agg``, ``OMP_NUM_THREADS=2``
and the Hugging Face hub offline, with this repository first on ``PYTHONPATH``; a Figure
that ends a cell is stored as a PNG, as Jupyter shows it, not as its text. The copy has one
cell more, after the title: a note (tagged ``rendered-note``) saying how it was executed. A copy is written atomically and only when its notebook ran
without an error; cell timings are not recorded and the temporary folder's name is replaced by
``<tmp>`` in the outputs, so a rerun changes little more than the numbers that depend on timing.
``tests/test_notebooks.py`` fails when a copy's cells differ from its notebook's (rerun this
command then and commit ``docs/notebooks/``). Names are notebook stems; none means all.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from varstudy import cli
from varstudy.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
RENDERED = ROOT / "docs" / "notebooks"
COMMAND = "python -m analysis.render_notebooks"
TIMEOUT_S = 180  # per cell, as in tests/test_notebooks.py
PLACEHOLDER = "<tmp>"
NOTE_TAG = "rendered-note"  # the one cell a copy adds to its notebook's (after the title cell)
NOTE = ("```{{note}}\nThis page is `notebooks/{name}.ipynb` executed with the small budget "
        "(`VARSTUDY_NB_SMALL=1`: tiny models and batches, few draws) by `" + COMMAND + " {name}`;"
        " its numbers illustrate the workflow and are not the study's results. Run the notebook "
        "for the full budget.\n```")
# A Figure that ends a cell is shown as a PNG (as in Jupyter) while the backend stays Agg: the
# kernel registers IPython's PNG formatter for Figures at start, outside the notebook's cells.
FIGURES_AS_PNG = ("--IPKernelApp.exec_lines=__import__('matplotlib_inline.backend_inline', "
                  "fromlist=['_']).set_matplotlib_formats('png')")


@contextmanager
def _environment(values: dict[str, str]):
    """Set ``values`` in ``os.environ`` (inherited by the kernel) and restore it afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    tempfile.tempdir = None  # re-read TMPDIR
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        tempfile.tempdir = None


def _scrub(value, tmp: str):
    """``value`` (an output's text or data, nested) with ``tmp`` replaced by the placeholder."""
    if isinstance(value, str):
        return value.replace(tmp, PLACEHOLDER)
    if isinstance(value, list):
        return [_scrub(v, tmp) for v in value]
    if isinstance(value, dict):
        return {k: _scrub(v, tmp) for k, v in value.items()}
    return value


def render(path: Path, out: Path = RENDERED) -> Path:
    """Execute the notebook ``path`` on the small budget and write its executed copy to
    ``out/<name>.ipynb``; returns that path. Raises nbclient's ``CellExecutionError`` (nothing
    written) when a cell fails."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory(prefix="render-nb-") as tmp:
        (Path(tmp) / "tmp").mkdir()
        env = {"VARSTUDY_NB_SMALL": "1", "VARSTUDY_NB_OUT": str(Path(tmp) / "figures"),
               "TMPDIR": str(Path(tmp) / "tmp"), "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "2",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               # this tree's varstudy and analysis, installed or not
               "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get(
                   "PYTHONPATH")])])}
        with _environment(env):
            client = NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                                    record_timing=False, extra_arguments=[FIGURES_AS_PNG],
                                    resources={"metadata": {"path": str(path.parent)}})
            client.execute()
        for cell in nb.cells:
            cell.metadata.pop("execution", None)
            if cell.cell_type == "code":
                cell.outputs = [nbformat.from_dict(_scrub(o, tmp)) for o in cell.outputs]
    note = nbformat.v4.new_markdown_cell(NOTE.format(name=path.stem),
                                         metadata={"tags": [NOTE_TAG]})
    note["id"] = NOTE_TAG  # a fixed id: a rerun adds no diff here
    nb.cells.insert(1 if nb.cells and nb.cells[0].cell_type == "markdown" else 0, note)
    nb.metadata.pop("papermill", None)
    nb.metadata.pop("widgets", None)
    text = nbformat.writes(nb) + "\n"
    return atomic_write_text(Path(out) / path.name, text)


def main(argv: list[str] | None = None) -> int:
    """``python -m analysis.render_notebooks [NAME ...]``: render the named notebooks (all by
    default); returns the exit status (0, 1 when a notebook failed, 2 for an unknown name)."""
    parser = cli.Parser(prog=COMMAND, description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="notebook stems (default: every notebook of notebooks/)")
    args = parser.parse_args(argv)
    paths = {p.stem: p for p in sorted(NOTEBOOKS.glob("*.ipynb"))}
    unknown = [n for n in args.names if n not in paths]
    if unknown:
        print(f"error: unknown notebook(s) {', '.join(unknown)}; valid choices: "
              f"{', '.join(paths)}", file=sys.stderr)
        return 2
    failed = 0
    for name in args.names or list(paths):
        try:
            print(f"wrote {render(paths[name]).relative_to(ROOT)}", flush=True)
        except Exception as error:  # noqa: BLE001 - one line per failed notebook, then go on
            failed += 1
            lines = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines() or [""]
            print(f"error: {name} not rendered: {type(error).__name__}: {lines[-1]}",
                  file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
