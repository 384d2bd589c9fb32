"""Sphinx configuration of varstudy's documentation site (see docs/contributing.md).

Build:  sphinx-build -W --keep-going -n -b html docs docs/_build/html
Serve:  sphinx-autobuild docs docs/_build/html --watch varstudy --watch analysis
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "docs" / "_ext")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

project = "varstudy"
author = "the varstudy authors"
copyright = "the varstudy authors, MIT license"  # noqa: A001 - Sphinx's name
release = version = "0.2.0"

extensions = [
    "myst_nb",                 # Markdown pages (MyST) and the notebooks, not executed
    "sphinx.ext.autodoc",      # the API reference, from docstrings
    "sphinx.ext.napoleon",     # their "Args:" sections (Google style)
    "sphinx.ext.mathjax",
    "varstudy_docs",           # CLI reference, figure registry, results tables, checks
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**/.ipynb_checkpoints", "pages.txt"]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist", "attrs_inline"]
myst_heading_anchors = 3
nb_execution_mode = "off"      # the notebooks are rendered as committed, never run by the build
nb_merge_streams = True

# The API reference: every public member, documented or not, so that a public name without a
# docstring reaches the check of NOTE [docstrings required] (docs/_ext/varstudy_docs.py).
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": True,
                           "member-order": "bysource"}
napoleon_numpy_docstring = False
autodoc_typehints = "signature"
autodoc_inherit_docstrings = True
autodoc_preserve_defaults = True
add_module_names = False
python_use_unqualified_type_names = True
# Type hints that name third-party classes: no inventory of torch, pandas, ... is fetched (the
# build is offline), so references into them are not checked.
nitpick_ignore_regex = [
    ("py:.*", r"(torch|pandas|pd|numpy|np|nn|transformers|matplotlib|argparse|pathlib|typing|collections"
              r"|concurrent|multiprocessing|threading|contextlib|dataclasses|enum|io|os|abc)"
              r"(\..*)?"),
    ("py:.*", r"(Tensor|Module|DataFrame|Series|Path|Axes|Figure|Generator|Callable|Iterable"
              r"|Iterator|Sequence|Mapping|Any|TextIO|BinaryIO|PreTrainedModel|Dataset"
              r"|TrainerCallback|TrainingArguments|TrainerState|TrainerControl|Trainer"
              r"|ndarray|dtype|device|Event|Stream|Lock|Thread|Queue|Popen|Namespace"
              r"|ArgumentParser|Action|Literal|Self|TypeVar|Hashable|PathLike|IO|module"
              r"|ModuleType|Axis|Colormap|Normalize|Artist|Line2D|GridSpec|SubFigure)"),
    # references in modules that another change was rewriting (see varstudy_docstring_pending)
    ("py:func", r"moments"), ("py:class", r"varstudy\.randomized\.layers\.RowMask"),
    ("py:.*", r"(optional|default|callable|iterable|sequence|mapping|Ellipsis|string)"),
    ("py:class", r"(dict|list|tuple|set)\[.*"),   # a generic's pieces as autodoc splits them
    ("py:class", r".*\._[A-Za-z]\w*"),             # private bases shown by show-inheritance
]
nitpicky = True
suppress_warnings = ["myst.header"]

html_theme = "furo"
html_title = "varstudy"
html_static_path: list[str] = []
html_theme_options = {"source_repository": "", "navigation_with_keys": True}

# NOTE [docstrings required] (docs/_ext/varstudy_docs.py): public names exempt from the
# docstring rule, with why; empty: every public name has one, and one added without fails the
# build.
varstudy_docstring_pending: dict[str, str] = {}
