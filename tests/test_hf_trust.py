"""The Trainer callback never changes training and never loses measurements.

* RNG: a data collator that draws from torch's, Python's and NumPy's global RNGs gives the same
  losses and weights with and without the callback (it collates its held batches and measures
  inside a fork of every global RNG).
* Resume: ``trainer.train(resume_from_checkpoint=...)`` appends to the interrupted run's rows
  (those of steps after the checkpoint are measured again), so layers.csv equals an
  uninterrupted run's.
* Staging: a fresh run that fails leaves an earlier finished result byte for byte.
"""

import random

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("accelerate")  # transformers' Trainer needs it

from transformers import (Trainer, TrainerCallback, TrainingArguments,  # noqa: E402
                          default_data_collator)

from varstudy.batching import encode  # noqa: E402
from varstudy.data import load_dataset  # noqa: E402
from varstudy.errors import VarstudyError  # noqa: E402
from varstudy.hf import VarianceCallback, forked_rng  # noqa: E402
from varstudy.models import load_model  # noqa: E402

TABLES = ("layers.csv", "summary.csv", "scopes.csv")


def _data(tok):
    enc = encode(load_dataset("synthetic", "train"), tok, 16)
    return [{k: v[i] for k, v in enc.items()} for i in range(len(enc["labels"]))]


def noisy_collate(features):
    """default_data_collator, then token masking drawn from all three global RNGs."""
    batch = default_data_collator(features)
    ids = batch["input_ids"].clone()
    ids[torch.rand(ids.shape) < 0.2] = 0
    ids[np.random.randint(ids.shape[0]), random.randrange(1, ids.shape[1])] = 0
    batch["input_ids"] = ids
    return batch


class Stop(TrainerCallback):
    """Raise at the end of step ``at`` (after every other callback of that step)."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.at:
            raise RuntimeError(f"stopped at step {self.at}")


def _trainer(out, callback=None, *, max_steps=4, save_steps=None, collate=noisy_collate,
             stop=None):
    model, tok = load_model("tiny-bert", dropout=True, seed=0)
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps,
                             per_device_train_batch_size=8, learning_rate=1e-3, logging_steps=1,
                             lr_scheduler_type="constant",  # the same steps for any max_steps
                             report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                             save_strategy="steps" if save_steps else "no",
                             save_steps=save_steps or 500)
    trainer = Trainer(model=model, args=args, train_dataset=_data(tok), data_collator=collate)
    if callback is not None:
        callback.attach(trainer)
    if stop is not None:
        trainer.add_callback(Stop(stop))  # after the VarianceCallback: its step is measured
    return trainer


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _callback(**kw):
    return VarianceCallback(every_n_steps=2, num_batches=2, batch_size=4, families=("rows",),
                            ratios=(0.25,), **kw)


def test_a_collator_that_draws_random_numbers_trains_the_same_with_the_callback(tmp_path):
    with_cb = _trainer(tmp_path / "with", _callback())
    with_cb.train()
    plain = _trainer(tmp_path / "without")
    plain.train()
    assert _losses(with_cb) == _losses(plain) and len(_losses(plain)) == 4
    for (name, p), q in zip(with_cb.model.named_parameters(), plain.model.parameters()):
        assert torch.equal(p, q), name
    table = pd.read_csv(tmp_path / "with" / "varstudy" / "layers.csv")
    assert sorted(set(table.train_step)) == [0, 2, 4]


@pytest.mark.parametrize("source", ["torch", "random", "numpy"])
def test_forked_rng_restores_every_global_rng(source):
    draw = {"torch": lambda: torch.rand(3).tolist(), "random": lambda: [random.random()],
            "numpy": lambda: np.random.rand(3).tolist()}[source]
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    expected = draw()
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    with forked_rng():
        inside = draw()
        torch.manual_seed(7), random.seed(7), np.random.seed(7)
        draw()
    assert inside == expected  # the fork starts from the caller's state ...
    assert draw() == expected  # ... and leaves it as it was


def _tables(folder):
    return {name: (folder / "varstudy" / name).read_bytes() for name in TABLES}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Tables of a 6-step run measured at steps 0, 2, 4, 6."""
    out = tmp_path_factory.mktemp("uninterrupted")
    _trainer(out, _callback(), max_steps=6, collate=default_data_collator).train()
    return _tables(out)


@pytest.mark.parametrize("interrupt", ["raise", "max_steps"])
def test_a_resumed_run_appends_to_its_earlier_measurements(tmp_path, uninterrupted, interrupt):
    # The first run measures steps 0, 2, 4, saves a checkpoint at step 3 and ends at step 5:
    # by an error (its rows stay staged) or by max_steps (its tables are published).
    # NOTE: default_data_collator, as the Trainer's own resume is exact only with a collator
    # that draws no random numbers (its loader collates the next batch before the checkpoint).
    first = _trainer(tmp_path, _callback(), max_steps=6 if interrupt == "raise" else 5,
                     save_steps=3, stop=5 if interrupt == "raise" else None,
                     collate=default_data_collator)
    if interrupt == "raise":
        with pytest.raises(RuntimeError, match="stopped at step 5"):
            first.train()
        staged = tmp_path / "varstudy" / ".callback.staging" / "layers.csv"
        assert sorted(set(pd.read_csv(staged).train_step)) == [0, 2, 4]
        assert not (tmp_path / "varstudy" / "layers.csv").exists()
        other = VarianceCallback(every_n_steps=2, num_batches=2, batch_size=4,
                                 families=("gaussian",), ratios=(0.25,))
        with pytest.raises(VarstudyError, match="valid choices: the same VarianceCallback"):
            _trainer(tmp_path, other, max_steps=6, collate=default_data_collator).train(
                resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    else:
        first.train()
        assert sorted(set(pd.read_csv(tmp_path / "varstudy" / "layers.csv").train_step)) == \
            [0, 2, 4]
    # Resumed at step 3: steps 0 and 2 are kept, step 4 is measured again, step 6 added.
    _trainer(tmp_path, _callback(), max_steps=6, collate=default_data_collator).train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert _tables(tmp_path) == uninterrupted  # every step once, bit for bit
    assert not (tmp_path / "varstudy" / ".callback.staging").exists()


def test_a_failed_fresh_run_leaves_the_finished_result_alone(tmp_path):
    _trainer(tmp_path, _callback(), max_steps=2).train()
    finished = _tables(tmp_path)
    with pytest.raises(RuntimeError, match="stopped at step 3"):
        _trainer(tmp_path, _callback(), max_steps=4, stop=3).train()
    assert _tables(tmp_path) == finished  # byte for byte, while the failed run's rows are staged
    staged = tmp_path / "varstudy" / ".callback.staging" / "layers.csv"
    assert sorted(set(pd.read_csv(staged).train_step)) == [0, 2]
    _trainer(tmp_path, _callback(), max_steps=4).train()  # a fresh run that ends replaces them
    assert sorted(set(pd.read_csv(tmp_path / "varstudy" / "layers.csv").train_step)) == \
        [0, 2, 4]
    assert not (tmp_path / "varstudy" / ".callback.staging").exists()


def test_resume_keeps_rows_up_to_its_step_and_refuses_an_incomplete_measurement(tmp_path):
    from varstudy.hf import rows_up_to

    lines = ["train_step,batch,family,ratio\n"] + [f"{t},{b},rows,0.25\n" for t in (0, 2, 4)
                                                  for b in (0, 1)]
    assert rows_up_to(lines, 3) == lines[:5] and rows_up_to(lines, 4) == lines
    with pytest.raises(VarstudyError, match="no train_step.*valid choices: a fresh run"):
        rows_up_to(lines[:1] + ["rows,0,0.25\n"], 3)
    cb = _callback()
    cb._check_resumed("".join(lines))  # the same options, complete steps
    with pytest.raises(VarstudyError, match="incomplete measurement; valid choices"):
        cb._check_resumed("".join(lines[:-1]))  # step 4 lost its batch 1
    with pytest.raises(VarstudyError, match="other families, ratios or num_batches"):
        cb._check_resumed("".join(lines).replace("0.25", "0.5"))
