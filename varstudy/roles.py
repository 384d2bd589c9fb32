"""Roles of linear layers from their module names: kind, encoder layer index, scope.

Module-name helpers (:func:`linear_names`, :func:`layer_kind`, :func:`layer_index`) tag each
linear layer with its role (query, key, value, attn_out, ffn_in, ffn_out, pooler, classifier,
other) and its encoder layer number, for the "per layer type" analyses.
"""

from __future__ import annotations

import re

from torch import nn

from varstudy.errors import VarstudyError

LAYER_KINDS = (
    "query", "key", "value", "attn_out", "ffn_in", "ffn_out", "pooler", "classifier", "other",
)


def linear_names(model: nn.Module) -> list[str]:
    """Qualified names of every ``nn.Linear`` module, in registration (forward) order."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


# (regex on the module name, kind); first match wins. BERT/RoBERTa names, e.g.
# "bert.encoder.layer.3.attention.self.query", "roberta.encoder.layer.0.output.dense",
# "bert.pooler.dense", "classifier" / "classifier.dense" / "classifier.out_proj";
# DistilBERT names ("q_lin", "lin1", "pre_classifier") and MPNet's ("attention.attn.q", ...,
# "classifier.dense" + "classifier.out_proj" as its head) are mapped as well.
_KIND_PATTERNS: tuple[tuple[re.Pattern, str], ...] = tuple(
    (re.compile(p), k)
    for p, k in (
        (r"(^|\.)(query|q_lin|q_proj)$|\.attn\.q$", "query"),
        (r"(^|\.)(key|k_lin|k_proj)$|\.attn\.k$", "key"),
        (r"(^|\.)(value|v_lin|v_proj)$|\.attn\.v$", "value"),
        (r"(^|\.)attention\.output\.dense$|(^|\.)(out_lin|o_proj)$|\.attn\.o$", "attn_out"),
        (r"(^|\.)intermediate\.dense$|(^|\.)lin1$", "ffn_in"),
        (r"(^|\.)layers?\.\d+\.output\.dense$|(^|\.)lin2$", "ffn_out"),
        (r"(^|\.)pooler\.dense$", "pooler"),
        (r"(^|\.)(classifier|pre_classifier|score)(\.|$)", "classifier"),
    )
)


def layer_kind(name: str) -> str:
    """Role of a linear module from its name: one of ``LAYER_KINDS`` ("other" if unrecognised)."""
    for pattern, kind in _KIND_PATTERNS:
        if pattern.search(name):
            return kind
    return "other"


HEAD_KINDS = ("pooler", "classifier")
SCOPES = ("all", "encoder", "head")


def layer_scope(name: str) -> str:
    """"head" for the pooler and classifier linears, "encoder" for every other linear.

    NOTE [scopes]: a model total is dominated by the layers with the largest gradients (in a
    fine-tuned encoder classifier the pooler and classifier), so results are reported per scope:
    "encoder", "head" and "all" (ARCHITECTURE.md, conventions).
    """
    return "head" if layer_kind(name) in HEAD_KINDS else "encoder"


def in_scope(name: str, scope: str) -> bool:
    """Whether linear module ``name`` belongs to ``scope`` (one of ``SCOPES``)."""
    if scope not in SCOPES:
        raise VarstudyError(f"unknown scope {scope!r}; valid choices: {', '.join(SCOPES)}")
    return scope == "all" or layer_scope(name) == scope


_INDEX = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """Encoder layer number in a module name ("bert.encoder.layer.3.output.dense" -> 3), or None
    for modules outside the layer stack (pooler, classifier, embeddings)."""
    match = _INDEX.search(name)
    return int(match.group(1)) if match else None
