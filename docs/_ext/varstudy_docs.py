"""Sphinx extension of varstudy's documentation: pages generated from the code and the results.

* ``varstudy-cli``: a command's options, read from its config dataclass (the single source of
  every option: :func:`varstudy.cli.option`), with its description, presets and positional
  choice from the command's ``parser()``.
* ``varstudy-figures``: the figure registry of ``analysis.figures`` as a table (name, command,
  description, thumbnail).
* ``results-table``: a table read from a committed CSV under ``results/`` (columns picked,
  rows filtered, optionally pivoted), so no number of a results table is typed into a page.
* NOTE [docstrings required]: every public function, class, method and property that autodoc
  documents must have a docstring of its own or inherit one; a missing one is a warning, and the
  strict build (``-W``) fails on it. Every module of ``varstudy`` and ``analysis`` must be
  documented on some API page.
* NOTE [page list]: the built site's pages must equal ``docs/pages.txt`` (a committed list);
  ``VARSTUDY_DOCS_WRITE_PAGES=1`` rewrites that file instead of checking it.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import inspect
import os
import pkgutil
import re
import typing
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

LOG = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = DOCS / "pages.txt"
PACKAGES = ("varstudy", "analysis")


# --------------------------------------------------------------------------------------------
# tables from docutils nodes
# --------------------------------------------------------------------------------------------

def _cell(value) -> nodes.entry:
    entry = nodes.entry()
    if isinstance(value, nodes.Node):
        entry += value
    else:
        entry += nodes.paragraph(text=str(value))
    return entry


def table(headers: list[str], rows: list[list], widths: list[int] | None = None) -> nodes.table:
    """A docutils table with a header row; cells are strings or nodes."""
    tab = nodes.table(classes=["varstudy-table"])
    group = nodes.tgroup(cols=len(headers))
    tab += group
    for w in widths or [1] * len(headers):
        group += nodes.colspec(colwidth=w)
    head = nodes.thead()
    group += head
    row = nodes.row()
    for h in headers:
        row += _cell(h)
    head += row
    body = nodes.tbody()
    group += body
    for values in rows:
        row = nodes.row()
        for v in values:
            row += _cell(v)
        body += row
    return tab


def _literal(text: str) -> nodes.paragraph:
    par = nodes.paragraph()
    par += nodes.literal(text=text)
    return par


# --------------------------------------------------------------------------------------------
# varstudy-cli
# --------------------------------------------------------------------------------------------

def _shown(value) -> str:
    from varstudy.cli import _shown as shown  # the same text as --help

    if isinstance(value, bool):
        return "on" if value else "off"
    return shown(value)


def _kind(hint) -> str:
    """A field's type as the command line reads it."""
    from varstudy.cli import _split

    inner, optional = _split(hint)
    if typing.get_origin(inner) is tuple:
        args = typing.get_args(inner)
        item = args[0].__name__
        text = f"comma list of {item}" if args[-1] is Ellipsis else \
            f"{len(args)} comma-separated {item}"
    else:
        text = "flag" if inner is bool else inner.__name__
    return text + (", or none" if optional else "")


def cli_rows(cls) -> list[list]:
    """(option, type, default, choices, help) for every field of the config dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        if hints[f.name] is bool:
            flag = f"{flag} / --no-{flag[2:]}"
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        rows.append([_literal(flag), _kind(hints[f.name]), _literal(_shown(default)),
                     ", ".join(meta.get("choices") or ()) or "",
                     meta.get("help") or f.name.replace("_", " ")])
    return rows


class CliDirective(SphinxDirective):
    """``varstudy-cli MODULE``: the options of the command whose ``parser()`` is in MODULE and
    whose config dataclass is ``:config:`` (a dotted path)."""

    required_arguments = 1
    option_spec = {"config": directives.unchanged_required,
                   "presets": directives.unchanged}

    def run(self):
        module = importlib.import_module(self.arguments[0])
        path, _, name = self.options["config"].rpartition(".")
        cls = getattr(importlib.import_module(path), name)
        parser = module.parser()
        out: list[nodes.Node] = []
        usage = parser.format_usage().replace("usage: ", "").strip()
        block = nodes.literal_block(text=usage, language="text")
        out.append(block)
        if parser.description:
            out.append(nodes.paragraph(text=" ".join(parser.description.split())))
        extra = [a for a in parser._actions
                 if a.dest not in {f.name for f in dataclasses.fields(cls)} and a.dest != "help"]
        rows = [[_literal(" / ".join(a.option_strings) or a.dest.upper()), "", "", "",
                 a.help or ""] for a in extra]
        out.append(table(["option", "type", "default", "choices", "what it does"],
                         rows + cli_rows(cls), [22, 12, 14, 16, 36]))
        presets = self.options.get("presets")
        if presets:
            mod_path, _, attr = presets.rpartition(".")
            values = getattr(importlib.import_module(mod_path), attr)
            prow = [[_literal(p), _literal(", ".join(f"--{k.replace('_', '-')} {_shown(v)}"
                                                     for k, v in over.items()) or "(defaults)")]
                    for p, over in values.items()]
            out.append(nodes.paragraph(text="Presets (each overrides only what differs from "
                                            "the defaults; the first is the default):"))
            out.append(table(["preset", "options it sets"], prow, [12, 70]))
        return out


# --------------------------------------------------------------------------------------------
# varstudy-exports
# --------------------------------------------------------------------------------------------

class ExportsDirective(SphinxDirective):
    """``varstudy-exports PACKAGE``: the names a package exports lazily (its ``_API`` map,
    :mod:`varstudy.lazy`), each linked to where it is defined and documented."""

    required_arguments = 1

    def run(self):
        from sphinx import addnodes

        package = self.arguments[0]
        api = importlib.import_module(package)._API
        items = nodes.bullet_list()
        for name in sorted(api):
            where = api[name] if "." in api[name] else f"{package}.{api[name]}"
            obj = getattr(importlib.import_module(where), name)
            par = nodes.paragraph()
            if inspect.isroutine(obj) or inspect.isclass(obj):
                where = obj.__module__
                ref = addnodes.pending_xref("", refdomain="py", reftype="obj",
                                            reftarget=f"{where}.{obj.__qualname__}",
                                            refexplicit=True,
                                            refwarn=True)
                ref += nodes.literal(text=name)
                par += ref
            else:
                par += nodes.literal(text=name)
            par += nodes.Text(f" (from {where})")
            items += nodes.list_item("", par)
        intro = nodes.paragraph(text=f"Names exported by {package} (imported on first use):")
        return [intro, items]


# --------------------------------------------------------------------------------------------
# varstudy-figures
# --------------------------------------------------------------------------------------------

class FiguresDirective(SphinxDirective):
    """``varstudy-figures``: every figure of the registry, with its command and thumbnail."""

    def run(self):
        from analysis.figures import FIGURE_ENTRIES

        rows = []
        for name, entry in FIGURE_ENTRIES.items():
            png = ROOT / "figures" / f"{name}.png"
            rel = os.path.relpath(png, Path(self.env.doc2path(self.env.docname)).parent)
            picture = nodes.paragraph()
            if png.exists():
                picture += nodes.image(uri=rel.replace(os.sep, "/"), width="220px",
                                       alt=name)
                self.env.note_dependency(str(png))
            else:
                picture += nodes.Text("not built yet")
            rows.append([picture, _literal(f"python -m analysis.figures {name}"),
                         entry.description])
        return [table(["figure", "command", "what"], rows, [30, 35, 35])]


# --------------------------------------------------------------------------------------------
# results-table
# --------------------------------------------------------------------------------------------

def _number(text: str, spec: str) -> str:
    try:
        value = float(text)
    except ValueError:
        return text
    return format(value, spec) if spec else text


class ResultsTableDirective(SphinxDirective):
    """``results-table PATH``: a table of the committed CSV at PATH (relative to the repository).

    Options: ``:columns: a, b=B header`` (the columns shown and their headers), ``:where:
    col=value; col=v1|v2`` (rows kept), ``:pivot: index, columns, values`` (one row per index
    value, one column per ``columns`` value), ``:format:`` (a format spec for numbers, e.g.
    ``.3g``), ``:caption:``.
    """

    required_arguments = 1
    option_spec = {"columns": directives.unchanged, "where": directives.unchanged,
                   "pivot": directives.unchanged, "format": directives.unchanged,
                   "caption": directives.unchanged}

    def run(self):
        path = ROOT / self.arguments[0]
        self.env.note_dependency(str(path))
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        for clause in filter(None, (c.strip() for c in self.options.get("where", "").split(";"))):
            key, _, allowed = clause.partition("=")
            keep = {v.strip() for v in allowed.split("|")}
            rows = [r for r in rows if r[key.strip()] in keep]
        if not rows:
            raise self.error(f"results-table {path}: no row left")
        spec = self.options.get("format", "")
        if "pivot" in self.options:
            index, column, value = (p.strip() for p in self.options["pivot"].split(","))
            cols = list(dict.fromkeys(r[column] for r in rows))
            keys = list(dict.fromkeys(r[index] for r in rows))
            cell = {(r[index], r[column]): r[value] for r in rows}
            headers = [index] + [f"{column} = {c}" for c in cols]
            body = [[k] + [_number(cell.get((k, c), ""), spec) for c in cols] for k in keys]
        else:
            named = [c.strip() for c in self.options.get("columns", "").split(",") if c.strip()]
            named = named or list(rows[0])
            pairs = [(c.partition("=")[0].strip(), (c.partition("=")[2] or c).strip())
                     for c in named]
            missing = [c for c, _ in pairs if c not in rows[0]]
            if missing:
                raise self.error(f"results-table {path}: no column {', '.join(missing)}")
            headers = [h for _, h in pairs]
            body = [[_number(r[c], spec) for c, _ in pairs] for r in rows]
        out = []
        if "caption" in self.options:
            out.append(nodes.paragraph(text=self.options["caption"]))
        out.append(table(headers, body))
        out.append(nodes.paragraph(text=f"(read from {self.arguments[0]} at build time)",
                                   classes=["varstudy-source"]))
        return out


# --------------------------------------------------------------------------------------------
# NOTE [docstrings required]
# --------------------------------------------------------------------------------------------

CHECKED = {"function", "class", "method", "exception", "property", "module", "classmethod",
           "staticmethod"}


def _auto_doc(obj) -> bool:
    """True for the docstring a dataclass or a NamedTuple writes when it has none."""
    doc = getattr(obj, "__doc__", None) or ""
    name = getattr(obj, "__name__", "")
    return inspect.isclass(obj) and (doc.startswith(f"{name}(") or
                                     doc.startswith(f"Create new instance of {name}("))


def missing_docstring(what: str, name: str, obj, lines: list[str]) -> bool:
    """True when autodoc found no docstring for a public ``name`` (NOTE [docstrings required])."""
    if what not in CHECKED or any(part.startswith("_") for part in name.split(".")):
        return False
    if what == "class" and _auto_doc(obj):
        return True
    return not any(line.strip() for line in lines)


def _plain(segment: str) -> str:
    """Docstring text outside backticks: ``|x|`` is an absolute value and ``name_`` a name,
    not reST's substitutions and references."""
    segment = segment.replace("|", "\\|")
    return re.sub(r"(\w)_(?=[\s,.;:/)\]]|$)", r"\1\\_", segment)


def escape_plain_text(lines: list[str]) -> None:
    """Escape, in place, what reST would misread in docstrings written as plain text with math
    (absolute values, trailing underscores), leaving literal blocks and backticks alone."""
    literal_indent = None
    previous = ""
    for i, line in enumerate(lines):
        indent = len(line) - len(line.lstrip())
        if literal_indent is not None:
            if line.strip() and indent <= literal_indent:
                literal_indent = None
            else:
                continue
        if previous.rstrip().endswith("::") and not line.strip():
            literal_indent = len(previous) - len(previous.lstrip())
            previous = line
            continue
        parts = re.split(r"(``.*?``|`[^`]*`)", line)
        lines[i] = "".join(_plain(p) if j % 2 == 0 else p for j, p in enumerate(parts))
        if line.strip():
            previous = line


def _check_docstring(app, what, name, obj, options, lines):
    escape_plain_text(lines)
    pending = app.config.varstudy_docstring_pending
    if missing_docstring(what, name, obj, lines):
        if name not in pending:
            LOG.warning("%s %s has no docstring (NOTE [docstrings required])", what, name,
                        type="varstudy", subtype="docstring")
    elif name in pending and what in CHECKED:
        LOG.warning("%s %s has a docstring now: take it off varstudy_docstring_pending in "
                    "docs/conf.py", what, name, type="varstudy", subtype="docstring")


def _import_target(target: str):
    """The object a dotted ``target`` names (a module attribute, possibly re-exported), or
    None."""
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for part in parts[i:]:
                obj = getattr(obj, part)
        except AttributeError:
            return None
        return obj
    return None


def _resolve(app, env, node, contnode):
    """References in docstrings written as the code reads them: a short name defined in
    another module (``VarstudyError``), a package's lazy re-export
    (``varstudy.measure.measure_now``), or a module constant, which the API pages list only
    when documented (it is shown as code, not linked)."""
    from sphinx.util.nodes import make_refnode

    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip("~.")
    objects = env.get_domain("py").objects
    found = [n for n in objects if n == target or n.endswith("." + target)]
    module = node.get("py:module") or ""
    if len(found) != 1:
        obj = None
        for where in filter(None, (target, f"{module}.{target}" if module else "")):
            obj = _import_target(where)
            if obj is not None:
                break
        home = getattr(obj, "__module__", None)
        full = f"{home}.{getattr(obj, '__qualname__', '')}" if home else None
        if full in objects:
            found = [full]
        elif obj is not None and node.get("reftype") in ("data", "attr", "obj"):
            return contnode
    if len(found) != 1:
        return None
    entry = objects[found[0]]
    return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id, contnode,
                        found[0])


def _skip_member(app, what, name, obj, skip, options):
    """Undocumented module constants and class attributes are left out (only callables,
    classes and properties must carry a docstring); everything else follows autodoc."""
    if skip or name.startswith("_"):
        return None
    current = app.env.temp_data.get("autodoc:module")
    home = getattr(obj, "__module__", None)
    if what == "module" and (inspect.isroutine(obj) or inspect.isclass(obj)) and current \
            and home != current:
        return True  # imported here, documented where it is defined
    if inspect.isroutine(obj) or inspect.isclass(obj) or isinstance(obj, property):
        return None
    if type(obj).__name__ in ("cached_property", "classmethod", "staticmethod"):
        return None
    return True


def all_modules(packages=PACKAGES) -> list[str]:
    """Every module of ``packages`` (``__main__`` modules are commands, not API)."""
    found = []
    for package in packages:
        pkg = importlib.import_module(package)
        found.append(package)
        found += [m.name for m in pkgutil.walk_packages(pkg.__path__, package + ".")
                  if not m.name.endswith("__main__")]
    return sorted(found)


def _check_consistency(app, env):
    documented = set(env.domains["py"].modules) if hasattr(env.domains, "__getitem__") \
        else set(env.get_domain("py").data["modules"])
    missing = [m for m in all_modules(app.config.varstudy_api_packages) if m not in documented]
    for module in missing:
        LOG.warning("module %s is on no API page (add it to docs/reference/api/)", module,
                    type="varstudy", subtype="api")
    if not app.config.varstudy_page_list:
        return
    page_list = Path(app.config.varstudy_page_list)
    pages = sorted(env.found_docs)
    text = "".join(p + "\n" for p in pages)
    if os.environ.get("VARSTUDY_DOCS_WRITE_PAGES"):
        page_list.write_text(text, encoding="utf-8")
        return
    committed = page_list.read_text(encoding="utf-8") if page_list.exists() else ""
    if committed != text:
        old, new = set(committed.split()), set(pages)
        LOG.warning("docs/pages.txt is not the built page list (added: %s; gone: %s); rebuild "
                    "with VARSTUDY_DOCS_WRITE_PAGES=1 and commit it (NOTE [page list])",
                    ", ".join(sorted(new - old)) or "none", ", ".join(sorted(old - new)) or "none",
                    type="varstudy", subtype="pages")


def setup(app):
    app.add_directive("varstudy-cli", CliDirective)
    app.add_directive("varstudy-figures", FiguresDirective)
    app.add_directive("varstudy-exports", ExportsDirective)
    app.add_directive("results-table", ResultsTableDirective)
    app.connect("autodoc-process-docstring", _check_docstring)
    app.connect("autodoc-skip-member", _skip_member)
    app.connect("env-check-consistency", _check_consistency)
    app.connect("missing-reference", _resolve)
    app.add_config_value("varstudy_docstring_pending", {}, "env")
    app.add_config_value("varstudy_api_packages", PACKAGES, "env")
    app.add_config_value("varstudy_page_list", str(PAGES), "env")
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
