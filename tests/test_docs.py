"""The documentation site (docs/, built by Sphinx: docs/contributing.md) and the README.

* the committed page list equals the pages' sources (NOTE [page list] in docs/_ext);
* the README fits on a screen and every link in it resolves;
* every fenced python/bash block of docs/ and README.md runs here, or says why not just above it
  (``<!-- not run: reason -->``); the runnable ones use the tiny models and write only into a
  temporary folder;
* a public name without a docstring fails the strict build (NOTE [docstrings required]).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS / "_ext"))
import varstudy_docs  # noqa: E402  (docs/_ext is not a package)

README_MAX_LINES = 200
NOT_RUN = re.compile(r"<!--\s*not run:\s*(.*?)\s*-->", re.S)


def doc_pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)


def test_page_list_is_the_sources():
    pages = {str(p.relative_to(DOCS).with_suffix("")) for p in doc_pages()}
    pages |= {f"notebooks/{p.stem}" for p in (ROOT / "notebooks").glob("*.ipynb")}
    committed = set((DOCS / "pages.txt").read_text().split())
    assert committed == pages, (sorted(committed - pages), sorted(pages - committed))


# README ---------------------------------------------------------------------------------------

def test_readme_fits_on_a_screen():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, len(lines)


def _links(text: str) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", text)


def _anchor_ok(page: Path, anchor: str) -> bool:
    """True when ``page`` has a heading whose slug (as MyST makes it) is ``anchor``."""
    def slug(title: str) -> str:
        title = re.sub(r"[^\w\- ]", "", title.strip().lower())
        return title.replace(" ", "-")
    return anchor in {slug(h) for h in re.findall(r"^#+\s+(.*)$", page.read_text(), re.M)}


def test_readme_links_resolve():
    broken = []
    for link in _links((ROOT / "README.md").read_text()):
        if re.match(r"[a-z]+://", link):
            continue
        path, _, anchor = link.partition("#")
        target = ROOT / path
        if not target.exists():
            broken.append(link)
        elif anchor and target.suffix == ".md" and not _anchor_ok(target, anchor):
            broken.append(link)
    assert not broken, broken


def test_readme_links_into_the_site():
    links = [link for link in _links((ROOT / "README.md").read_text()) if link.startswith("docs/")]
    assert len(links) >= 5, links


def test_docs_link_only_files_that_exist():
    """Figures, tables, results and notebooks that the pages link or include are in the tree."""
    missing = []
    for page in doc_pages():
        text = page.read_text()
        refs = _links(text) + re.findall(r"```\{include\}\s+(\S+)", text)
        for ref in refs:
            if re.match(r"[a-z]+://", ref) or ref.startswith("#"):
                continue
            path = ref.partition("#")[0]
            if not (page.parent / path).exists():
                missing.append(f"{page.relative_to(ROOT)}: {ref}")
        for csv in re.findall(r"```\{results-table\}\s+(\S+)", text):
            if not (ROOT / csv).exists():
                missing.append(f"{page.relative_to(ROOT)}: {csv}")
    assert not missing, missing


# Code blocks ----------------------------------------------------------------------------------

def code_blocks(path: Path) -> list[tuple[str, int, str, str | None]]:
    """(language, line, code, reason not run) of every fenced python/bash block of ``path``."""
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        match = re.match(r"^```(python|bash)\s*$", lines[i])
        if not match:
            i += 1
            continue
        start = i
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = "\n".join(lines[max(0, start - 3):start])
        reason = NOT_RUN.findall(before)
        found.append((match.group(1), start + 1, "\n".join(lines[start + 1:end]),
                      reason[-1] if reason else None))
        i = end + 1
    return found


def all_blocks():
    for path in [ROOT / "README.md", *doc_pages()]:
        for lang, line, code, reason in code_blocks(path):
            yield pytest.param(lang, code, reason, id=f"{path.relative_to(ROOT)}:{line}")


BLOCKS = list(all_blocks())


def test_the_docs_have_code_blocks_and_most_run():
    run = [b for b in BLOCKS if b.values[2] is None]
    assert len(BLOCKS) >= 20 and len(run) >= 8, (len(BLOCKS), len(run))


@pytest.mark.parametrize("lang, code, reason", BLOCKS)
def test_code_block_runs_or_says_why(lang, code, reason, tmp_path):
    if reason is not None:
        assert len(reason.split()) >= 3, "a block that is not run says why"
        return
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg",
               OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT))
    if lang == "python":
        argv, cwd = [sys.executable, "-c", code], ROOT  # reads committed files, writes none
    else:
        work = tmp_path / "work"
        work.mkdir()
        for name in ("results", "figures"):  # read-only inputs; outputs go under _docs_run/
            (work / name).symlink_to(ROOT / name)
        argv, cwd = ["bash", "-euo", "pipefail", "-c", code.replace("\\\n", " ")], work
        assert "--out results" not in code and "--out figures" not in code
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


# NOTE [docstrings required] -------------------------------------------------------------------

def test_missing_docstring_rules():
    assert varstudy_docs.missing_docstring("function", "pkg.mod.f", None, [])
    assert varstudy_docs.missing_docstring("method", "pkg.mod.C.m", None, ["", "  "])
    assert not varstudy_docs.missing_docstring("function", "pkg.mod._private", None, [])
    assert not varstudy_docs.missing_docstring("function", "pkg.mod.f", None, ["Does f."])
    assert not varstudy_docs.missing_docstring("data", "pkg.mod.CONSTANT", None, [])


def test_plain_text_docstrings_are_escaped_outside_literals():
    lines = ["norm |x| of ``|y|`` and :func:`f`, column var_sketch_", "Example::", "",
             "    a|b|", "after |z|"]
    varstudy_docs.escape_plain_text(lines)
    assert lines == ["norm \\|x\\| of ``|y|`` and :func:`f`, column var_sketch\\_", "Example::",
                     "", "    a|b|", "after \\|z\\|"]


def _tiny_site(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    tmp_path.mkdir()
    (tmp_path / "tinypkg.py").write_text(textwrap.dedent(body))
    src = tmp_path / "site"
    src.mkdir()
    (src / "conf.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(tmp_path)!r}, {str(DOCS / "_ext")!r}]
        extensions = ["sphinx.ext.autodoc", "varstudy_docs"]
        autodoc_default_options = {{"members": True, "undoc-members": True}}
        varstudy_api_packages = ()
        varstudy_page_list = ""
    """))
    (src / "index.rst").write_text("Tiny\n====\n\n.. automodule:: tinypkg\n")
    return subprocess.run([sys.executable, "-m", "sphinx", "-W", "-q", "-b", "html", str(src),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)


def test_a_public_name_without_a_docstring_fails_the_strict_build(tmp_path):
    documented = textwrap.dedent('''
        """A tiny module."""

        def documented():
            """Has one."""
    ''')
    assert _tiny_site(tmp_path / "a", documented).returncode == 0
    proc = _tiny_site(tmp_path / "b", documented + "\ndef added_later():\n    return 1\n")
    assert proc.returncode != 0
    assert "function tinypkg.added_later has no docstring" in proc.stderr
