"""Plans as files: :func:`load_plan` reads a plan.json of ``python -m varstudy.plan``, and
:func:`check_plan_layers` is the one check, shared by ``randomize``, ``measure --plan``,
``measure_now``, fine-tuning and the benchmarks, that a plan fits the model it is used on.

NOTE [a plan names exactly its layers]: a plan made from a measure run names every layer that
run measured, each with a ratio or "exact". Used on a model, it must name exactly the linear
layers selected there (``randomize``'s include/exclude, ``measure``'s --layers; default every
nn.Linear): a plan made for another model, or an empty one, would otherwise leave layers
unplanned, and measure would report zero sketch variance for them as if it were a result.
"""

from __future__ import annotations

import json
from pathlib import Path

from varstudy.errors import VarstudyError

EXACT = "exact"
SHOWN = 6  # layer names listed in an error, then a count
# The families ``python -m varstudy.plan`` can plan, each with how its sketch variance falls
# with the rows k a layer keeps (varstudy.randomized.plan): "inverse" V = C/ρ, "wor" (without
# replacement) V = C·(1/ρ − 1) over the rows it draws among. rows-wor-real is left out: its
# variance is over the real rows m, which layers.csv holds for rows-live and rows-adaptive only.
VARIANCE_MODELS = {"gaussian": "inverse", "rademacher": "inverse", "countsketch": "inverse",
                   "srht": "inverse", "rows": "inverse", "rows-wor": "wor",
                   "rows-norm": "inverse", "rows-real": "inverse", "rows-live": "wor",
                   "rows-adaptive": "inverse"}


def load_plan(source) -> tuple[str, dict[str, float | str], float | None]:
    """(family, {layer: ρ or "exact"}, nominal ratio) of a plan: a plan.json path or its dict.

    The nominal ratio is the uniform ρ that stores as many numbers (the plan's budget), or None.
    """
    data = source
    if not isinstance(source, dict):
        try:
            data = json.loads(Path(source).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as err:  # JSON/UTF-8 errors: ValueErrors
            why = " ".join(str(err).split())
            raise VarstudyError(f"plan {source} cannot be read as JSON ({why}); valid choices: "
                                "a plan.json written by python -m varstudy.plan") from None
    if not isinstance(data, dict) or "family" not in data or "layers" not in data:
        raise VarstudyError("not a varstudy plan: expected keys 'family' and 'layers'; valid "
                            "choices: a plan.json written by python -m varstudy.plan")
    from varstudy.names import SKETCH_NAMES
    if data["family"] not in SKETCH_NAMES:
        raise VarstudyError(f"plan family {data['family']!r} is unknown; valid choices: "
                            f"{', '.join(SKETCH_NAMES)}")
    if not isinstance(data["layers"], dict) or not data["layers"]:
        raise VarstudyError("plan names no layers; valid choices: a plan.json written by "
                            "python -m varstudy.plan from a measure run (every layer a ratio "
                            "or 'exact')")
    ratios = {}
    for name, entry in data["layers"].items():
        r = entry.get("ratio") if isinstance(entry, dict) else entry
        if r != EXACT and not (isinstance(r, (int, float)) and not isinstance(r, bool)
                               and 0 < r <= 1):
            raise VarstudyError(f"plan layer {name!r} has ratio {r!r}; valid choices: a number "
                                "in (0, 1] or 'exact'")
        ratios[name] = r
    nominal = data.get("nominal_ratio")
    if nominal is not None and not (isinstance(nominal, (int, float))
                                    and not isinstance(nominal, bool) and 0 < nominal <= 1):
        raise VarstudyError(f"plan nominal_ratio {nominal!r} is not a ratio; valid choices: a "
                            "number in (0, 1], or null")
    return data["family"], ratios, (float(nominal) if nominal is not None else None)


def check_plan_layers(planned, layers, what: str = "the model") -> None:
    """Raise unless the plan's layer names (``planned``: a dict or names) are exactly
    ``layers``, the linear layers selected on ``what`` (NOTE [a plan names exactly its
    layers]); the one-line error lists the missing and the extra names."""
    chosen = set(layers)
    missing = [n for n in layers if n not in planned]
    extra = [n for n in planned if n not in chosen]
    if not missing and not extra:
        return
    parts = [f"{what} lacks {len(extra)} it names ({_names(extra)})" if extra else "",
             f"it leaves out {len(missing)} of {what}'s ({_names(missing)})" if missing else ""]
    raise VarstudyError(f"the plan does not name exactly the {len(chosen)} selected linear "
                        f"layers: {'; '.join(p for p in parts if p)}; valid choices: a plan made "
                        "by python -m varstudy.plan from a measure run of this model with the "
                        "same layer selection")


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown + (f", ... ({len(names)} in all)" if len(names) > SHOWN else "")
