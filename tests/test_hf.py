"""The Trainer callback: logged values equal measure_now's, and training is unchanged by it."""

import pandas as pd
import pytest
import torch

pytest.importorskip("accelerate")  # transformers' Trainer needs it

from transformers import Trainer, TrainingArguments, default_data_collator  # noqa: E402

from varstudy.data import load_dataset  # noqa: E402

from varstudy.batching import encode
from varstudy.errors import VarstudyError  # noqa: E402
from varstudy.hf import VarianceCallback, log_values  # noqa: E402
from varstudy.measure import measure_now  # noqa: E402
from varstudy.models import load_model  # noqa: E402
from varstudy.randomized.layers import randomize  # noqa: E402


def _data(tok):
    enc = encode(load_dataset("synthetic", "train"), tok, 16)
    return [{k: v[i] for k, v in enc.items()} for i in range(len(enc["labels"]))]


def _train(tmp_path, randomized: bool, callback: VarianceCallback | None):
    model, tok = load_model("tiny-bert", dropout=True, seed=0)
    if randomized:
        randomize(model, 0.5, "rows", seed=3)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8,
                             learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True,
                             seed=0, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_data(tok),
                      data_collator=default_data_collator)
    if callback is not None:
        callback.attach(trainer)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return model, losses, trainer


@pytest.mark.parametrize("randomized", [False, True])
def test_callback_logs_measure_now_and_leaves_training_alone(tmp_path, randomized):
    cb = VarianceCallback(every_n_steps=2, num_batches=3, batch_size=4, families=("gaussian",
                          "rows"), ratios=(0.25,))
    model, losses, trainer = _train(tmp_path / "with", randomized, cb)
    plain, plain_losses, _ = _train(tmp_path / "without", randomized, None)
    assert losses == plain_losses and len(losses) == 4  # same dropout, batches, sketches
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), name
    logged = {h["step"]: h for h in trainer.state.log_history if "varstudy/measure_s" in h}
    assert sorted(logged) == [0, 2, 4]
    expected = log_values(measure_now(model, cb.batches, ("gaussian", "rows"), (0.25,),
                                      population=cb.population, train_step=4))
    for key, value in expected.items():
        assert logged[4][key] == pytest.approx(value, rel=1e-12), key
    assert "varstudy/rows@0.25/ratio_encoder" in expected
    assert "varstudy/gaussian@0.25/ratio_classifier" in expected
    table = pd.read_csv(tmp_path / "with" / "varstudy" / "layers.csv")
    assert sorted(set(table.train_step)) == [0, 2, 4] and set(table.batch) == {0, 1, 2}
    scopes = pd.read_csv(tmp_path / "with" / "varstudy" / "scopes.csv")
    assert set(scopes.scope) == {"encoder", "head", "all"}
    assert model.training  # mode restored


def test_measure_now_on_a_randomized_model_measures_its_exact_layers():
    model, tok = load_model("tiny-bert", dropout=False, seed=0)
    batch = {k: torch.stack([d[k] for d in _data(tok)[:4]]) for k in
             ("input_ids", "attention_mask", "token_type_ids", "labels")}
    exact = measure_now(model, [batch], ("rows",), (0.5,))
    randomize(model, 0.5, "gaussian", seed=1)
    before = {n: m.calls for n, m in model.named_modules() if hasattr(m, "calls")}
    again = measure_now(model, [batch], ("rows",), (0.5,))
    pd.testing.assert_frame_equal(exact, again)
    assert before == {n: m.calls for n, m in model.named_modules() if hasattr(m, "calls")}
    assert all(p.grad is None for p in model.parameters())


def test_callback_needs_attach_and_valid_options(tmp_path):
    with pytest.raises(VarstudyError, match="valid choices: gaussian"):
        VarianceCallback(families=("nope",))
    with pytest.raises(VarstudyError, match="every_n_steps"):
        VarianceCallback(every_n_steps=0)
    model, tok = load_model("tiny-bert", dropout=False, seed=0)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_data(tok),
                      data_collator=default_data_collator, callbacks=[VarianceCallback()])
    with pytest.raises(VarstudyError, match="attach"):
        trainer.train()


def test_callback_benchmark_runs(tmp_path):
    from varstudy import bench

    argv = ["callback", "--model", "tiny-bert", "--batch-size", "4", "--max-length", "16",
            "--steps", "4", "--every", "2", "--num-batches", "2", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    table = pd.read_csv(tmp_path / "callback.csv").set_index("quantity").value
    assert table["measurements"] == 2 and table["steps"] == 4
    assert table["measurement_over_step"] == pytest.approx(
        table["measurement_time"] / table["step_time"])
    assert table["overhead_at_interval"] == pytest.approx(
        table["measurement_time"] / (2 * table["step_time"]))
