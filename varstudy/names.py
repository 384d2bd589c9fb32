"""Names the commands accept, importable without torch, so that ``--help`` answers at once.

Each tuple mirrors a registry that lives next to the code it names (tests/test_cli.py checks
that they agree): sketch families (``randomized.sketches.SKETCHES``), datasets
(``data.DATASETS``), registered models (``models.MODELS``), paddings, scopes, dtypes.
"""

# The families that need nothing but the layer input; the row-real ones also read the attention
# mask (NOTE [real rows] in varstudy.randomized.sketches), rows-live and rows-adaptive also the
# model's first-token layers and earlier backward passes (varstudy.randomized.informed), wta-crs
# the minibatch's dataset indices (varstudy.randomized.wtacrs).
# Defaults evaluate the base ones.
BASE_SKETCH_NAMES = ("gaussian", "rademacher", "countsketch", "srht", "rows", "rows-wor",
                     "rows-norm")
SKETCH_NAMES = (*BASE_SKETCH_NAMES, "rows-real", "rows-wor-real", "rows-live", "rows-adaptive",
                "wta-crs")
GLUE_TASK_NAMES = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
DATASET_NAMES = ("rotten_tomatoes", "imdb", "synthetic",
                 *(f"glue:{task}" for task in GLUE_TASK_NAMES))
MODEL_NAMES = ("minilm", "mpnet-base", "tiny-bert", "tiny-roberta")
PADDINGS = ("fixed", "dynamic")
SCOPES = ("all", "encoder", "head")
DTYPE_NAMES = ("float32", "float64", "bfloat16")
MODEL_HELP = ("model: " + ", ".join(MODEL_NAMES)
              + ", a local Hugging Face directory, or a hub id where the hub is reachable")
DEVICE_HELP = "auto (cuda when present), cpu, cuda or cuda:N"
