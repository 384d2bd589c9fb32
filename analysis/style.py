"""One look for every figure: a family -> (colour, marker) palette and one axis-styling helper.

Colours are the Okabe–Ito palette (safe for the common forms of colour blindness); each sketch
family keeps its colour and marker in every figure, and the exact baseline is always black.
Figures are built with :func:`new_figure`, which makes a :class:`matplotlib.figure.Figure`
directly, so nothing here touches pyplot's global state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import to_hex, to_rgb
from matplotlib.figure import Figure

from varstudy.errors import VarstudyError

# Okabe & Ito (2008), "Color Universal Design".
OKABE_ITO = {
    "black": "#000000", "orange": "#E69F00", "sky_blue": "#56B4E9", "green": "#009E73",
    "yellow": "#F0E442", "blue": "#0072B2", "vermillion": "#D55E00", "purple": "#CC79A7",
}


# Tol (2021), "Colour schemes", muted qualitative scheme.
TOL_MUTED = {"rose": "#CC6677", "sand": "#DDCC77", "green": "#117733", "wine": "#882255",
             "indigo": "#332288"}


@dataclass(frozen=True)
class FamilyStyle:
    """How one sketch family is drawn everywhere."""

    color: str
    marker: str
    label: str


FAMILY_STYLES: dict[str, FamilyStyle] = {
    "exact": FamilyStyle(OKABE_ITO["black"], "s", "exact"),
    "gaussian": FamilyStyle(OKABE_ITO["blue"], "o", "Gaussian"),
    "rademacher": FamilyStyle(OKABE_ITO["sky_blue"], "^", "Rademacher"),
    "countsketch": FamilyStyle(OKABE_ITO["green"], "D", "CountSketch"),
    "srht": FamilyStyle(OKABE_ITO["orange"], "v", "SRHT"),
    "rows": FamilyStyle(OKABE_ITO["vermillion"], "P", "rows (uniform)"),
    "rows-wor": FamilyStyle(OKABE_ITO["yellow"], "X", "rows (w/o repl.)"),
    "rows-norm": FamilyStyle(OKABE_ITO["purple"], "*", "rows (norm)"),
    # the row samplers that read the mask, the model's structure or earlier gradients, in Paul
    # Tol's muted colours (also safe for the common colour-vision deficiencies)
    "rows-real": FamilyStyle(TOL_MUTED["rose"], "p", "rows (real)"),
    "rows-wor-real": FamilyStyle(TOL_MUTED["sand"], "h", "rows (w/o repl., real)"),
    "rows-live": FamilyStyle(TOL_MUTED["green"], "d", "rows (live)"),
    "rows-adaptive": FamilyStyle(TOL_MUTED["wine"], ">", "rows (adaptive)"),
    "wta-crs": FamilyStyle(TOL_MUTED["indigo"], "<", "WTA-CRS"),
}
FAMILY_ORDER = tuple(FAMILY_STYLES)
_SPARE_MARKERS = ("h", "p", "<", ">", "d", "8")

# Sampling variance is not a family: it is drawn as a grey reference everywhere.
SAMPLING_STYLE = FamilyStyle("#7F7F7F", "", "sampling (minibatch)")

LAYER_KIND_ORDER = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out", "pooler",
                    "classifier", "other")

FIGSIZE_PANEL = (4.2, 3.2)  # inches per panel
SAVE_DPI = 200


def family_style(family: str) -> FamilyStyle:
    """The style of ``family``; an unregistered name gets a stable grey shade and spare marker."""
    if family in FAMILY_STYLES:
        return FAMILY_STYLES[family]
    h = sum(map(ord, str(family)))
    grey = 0.25 + 0.5 * ((h % 7) / 6)
    return FamilyStyle(to_hex((grey, grey, grey)), _SPARE_MARKERS[h % len(_SPARE_MARKERS)],
                       str(family))


def family_color(family: str) -> tuple[float, float, float]:
    """RGB of ``family`` (see :func:`family_style`)."""
    return to_rgb(family_style(family).color)


def order_families(families: Iterable[str]) -> list[str]:
    """Families in palette order (exact first), unknown ones last, alphabetically."""
    unique = list(dict.fromkeys(families))
    known = [f for f in FAMILY_ORDER if f in unique]
    return known + sorted(f for f in unique if f not in FAMILY_STYLES)


def order_kinds(kinds: Iterable[str]) -> list[str]:
    """Layer kinds in model order (query ... classifier)."""
    unique = set(kinds)
    return [k for k in LAYER_KIND_ORDER if k in unique] + sorted(unique - set(LAYER_KIND_ORDER))


def shade(color, amount: float) -> tuple[float, float, float]:
    """``color`` mixed with white: amount 0 is the colour itself, 1 is white."""
    rgb = np.array(to_rgb(color) if isinstance(color, str) else color, dtype=float)
    return tuple(rgb + (1.0 - rgb) * float(np.clip(amount, 0.0, 1.0)))


def ratio_shades(family: str, ratios: Iterable[float]) -> dict[float, tuple[float, float, float]]:
    """One shade of the family colour per ratio, light (small ρ) to full (largest ρ)."""
    ratios = sorted(set(float(r) for r in ratios))
    if len(ratios) == 1:
        return {ratios[0]: family_color(family)}
    return {r: shade(family_color(family), 0.65 * (1 - i / (len(ratios) - 1)))
            for i, r in enumerate(ratios)}


def new_figure(nrows: int = 1, ncols: int = 1, *, panel: tuple[float, float] = FIGSIZE_PANEL,
               sharex: bool = False, sharey: bool = False, squeeze: bool = False):
    """A (Figure, axes array) pair, constrained layout, without pyplot state; a grid without
    panels (the inputs left nothing to draw) is a one-line VarstudyError."""
    if nrows < 1 or ncols < 1:
        raise VarstudyError(f"nothing to draw: the inputs leave a {nrows} × {ncols} grid of "
                            "panels; valid choices: inputs with rows for this figure")
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharex=sharex, sharey=sharey, squeeze=squeeze)
    return fig, axes


def facet_grid(n: int, max_cols: int, **kwargs):
    """A grid of at least ``n`` panels, at most ``max_cols`` wide, the spare ones hidden:
    (figure, the axes array, the first ``n`` axes in reading order)."""
    ncols = max(1, min(max_cols, n))
    fig, axes = new_figure(-(-n // ncols), ncols, squeeze=False, **kwargs)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes, list(axes.flat[:n])


def style_axes(ax: Axes, *, xlabel: str | None = None, ylabel: str | None = None,
               title: str | None = None, logx: bool = False, logy: bool = False,
               legend: bool | str = False) -> Axes:
    """The one axis-styling helper: labels, log scales, light grid, no top/right spines."""
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title, fontsize="medium")
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.grid(True, which="major", color="0.9", linewidth=0.7)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize="small")
    if legend:
        ax.legend(fontsize="x-small", frameon=False,
                  loc=legend if isinstance(legend, str) else "best")
    return ax


def percent_ticks(ax: Axes, ratios: Iterable[float]) -> None:
    """Put x ticks at the given compression ratios, labelled in percent."""
    ratios = sorted(set(float(r) for r in ratios if np.isfinite(r)))
    ax.set_xticks(ratios)
    ax.set_xticklabels([f"{100 * r:g}%" for r in ratios])
    ax.minorticks_off()
