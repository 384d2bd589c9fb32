"""Progress bars: tqdm's notebook widget inside Jupyter when ipywidgets is installed, the text
bar everywhere else (``tqdm.auto`` alone warns "IProgress not found" in a notebook without
ipywidgets, the light CI path; ``pip install -e ".[notebooks]"`` brings the widgets)."""

from __future__ import annotations


def _pick():
    import importlib.util

    if importlib.util.find_spec("ipywidgets") is None:
        from tqdm.std import tqdm
        return tqdm
    from tqdm.auto import tqdm
    return tqdm


tqdm = _pick()
