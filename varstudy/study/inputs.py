"""The studies' inputs: the data and the model, checked before a study's folder changes, and
the conversion of one model between the configurations of a grid."""

from __future__ import annotations

from pathlib import Path

from varstudy.errors import VarstudyError
from varstudy.study.config import StudyConfig


def check_inputs(config: StudyConfig, study: str) -> None:
    """Load the data and the model once and check the batch sizes against the data, so that a bad
    --model, --task or batch fails before the study's folder is touched."""
    from varstudy.data import load_dataset
    from varstudy.batching import encode
    from varstudy.models import load_model

    if study == "throughput" and not config.memory_from and len(config.batch_sizes) < 2:
        raise VarstudyError(f"the max-batch fit draws a line through the memory at each batch "
                            f"size, and batch_sizes {config.batch_sizes} holds one; valid "
                            "choices: two or more --batch-sizes, e.g. 4,8,16,32")
    sizes = {"accuracy": [config.batch_size], "memory": list(config.batch_sizes),
             "throughput": [config.batch_size] + ([] if config.memory_from
                                                  else list(config.batch_sizes)),
             "frontier": [config.batch_size]}[study]
    data = train_data(config, sizes)
    if study == "frontier" and frontier_examples(config) > len(data):
        raise VarstudyError(f"the frontier study draws {frontier_examples(config)} training "
                            f"examples (batch_size x (1 + 2 num_batches)), more than the "
                            f"{len(data)} of {config.task!r}; valid: a smaller batch_size or "
                            "num_batches")
    if study == "frontier" and config.accumulation and \
            max(config.accumulation) > config.batch_size // 2:
        raise VarstudyError(f"accumulation {config.accumulation} leaves micro-batches of fewer "
                            f"than 2 of the {config.batch_size} examples (the engine measures "
                            "a sketch's variance per micro-batch, with its sampling variance, "
                            "which needs 2); valid: micro-batch counts <= batch_size // 2 "
                            f"({config.batch_size // 2})")
    if study == "accuracy":
        load_dataset(config.task, "validation", data_dir=config.data_dir)
    model, tokenizer = load_model(config.model, num_labels=data.num_labels, device="cpu")
    encode(data.subset(slice(0, 1)), tokenizer, config.max_length)
    if study == "frontier":  # checkpointing needs a BERT/RoBERTa/MPNet layer stack
        from varstudy.checkpointing.encoder import find_encoder

        find_encoder(model)
    if config.memory_from and study == "throughput" and not Path(config.memory_from).is_file():
        raise VarstudyError(f"memory_from file {config.memory_from} not found; valid choices: "
                            "a memory.csv written by `study memory`, or none (measure again)")


def frontier_examples(config: StudyConfig) -> int:
    """Training examples the frontier study draws: the timed minibatch, then ``num_batches``
    for the plans' statistics and ``num_batches`` held out for the variance."""
    return config.batch_size * (1 + 2 * config.num_batches)


def train_data(config: StudyConfig, sizes):
    """The training split of ``config.task``; an error when a batch size exceeds it."""
    from varstudy.data import load_dataset

    data = load_dataset(config.task, "train", data_dir=config.data_dir)
    if max(sizes) > len(data):
        raise VarstudyError(f"batch size {max(sizes)} exceeds the {len(data)} training examples "
                            f"of {config.task!r}; valid: batch sizes <= {len(data)}")
    return data


def model_and_batches(config: StudyConfig, device: str, sizes):
    """The model (dropout on, head seeded 0) and, per batch size b, the first b training
    examples on ``device``."""
    from varstudy.batching import encode
    from varstudy.finetune.training import to_device
    from varstudy.models import load_model

    data = train_data(config, sizes)
    model, tok = load_model(config.model, num_labels=data.num_labels, dropout=True, seed=0,
                            device=device)
    enc = encode(data.subset(slice(0, max(sizes))), tok, config.max_length)
    return model, {b: to_device({k: v[:b] for k, v in enc.items()}, device) for b in sizes}


def convert(model, family: str, ratio: float, seed: int = 0) -> None:
    """Make ``model``'s linears exact, then convert them all to (family, ratio) unless exact."""
    from varstudy.randomized.layers import derandomize, randomize

    derandomize(model)
    if family != "exact":
        randomize(model, ratio, family, seed=seed)
