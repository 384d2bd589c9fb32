"""Fine-tuning CLI and engine: learning with converted layers, GLUE formats, tables, CLI errors."""

import json
import math

import pandas as pd
import pytest

from varstudy import finetune
from varstudy.errors import VarstudyError
from varstudy.finetune import FinetuneConfig

TINY = dict(model="tiny-bert", batch_size=4, max_length=16, max_steps=2, eval_every=1,
            progress=False, num_threads=2)


def test_converted_minilm_learns_rotten_tomatoes(tmp_path):
    """ρ = 0.2 rows sketches in all 38 linears of MiniLM: accuracy beats chance.

    Under H0 "no better than chance" the accuracy on n_eval balanced examples has mean 0.5 and
    sd ≤ sqrt(0.25 / n_eval); a 3-sd margin has a false-pass rate ≈ 0.13% (one evaluation).
    (The per-step training loss of 30 steps at B = 16 is too noisy to carry a claim.)
    """
    n_eval = 200
    config = FinetuneConfig(sketch="rows", ratio=0.2, batch_size=16, max_length=32, max_steps=30,
                            lr=3e-4, dropout=False, eval_every=30, eval_examples=n_eval,
                            out=str(tmp_path), progress=False)
    result = finetune.train(config)
    row = result.run.iloc[0]
    assert row.n_converted == 38 and row.metric == "accuracy" and row.n_eval == n_eval
    assert len(result.steps) == 30 and result.steps.loss.notna().all()
    assert row.best_value > 0.5 + 3 * math.sqrt(0.25 / n_eval)
    assert 0 < row.saved_linear_mib < row.saved_mib
    folder = tmp_path / finetune.run_name(config)
    assert {p.name for p in folder.iterdir()} == {"steps.csv", "evals.csv", "run.csv",
                                                  "config.json"}


def _write_glue(root, folder, header, rows):
    path = root / folder
    path.mkdir(parents=True, exist_ok=True)
    lines = ([header] if header else []) + rows
    for name in ("train.tsv", "dev.tsv"):
        (path / name).write_text("\n".join("\t".join(r) for r in lines) + "\n")


WORDS = ["good film", "bad plot", "great acting", "awful story", "fine music", "poor script",
         "nice scene", "boring end"]


def _glue_fixtures(root):
    cola = [["src", str(i % 2), "", w] for i, w in enumerate(WORDS)]
    _write_glue(root, "CoLA", None, cola)
    _write_glue(root, "SST-2", ["sentence", "label"], [[w, str(i % 2)] for i, w in enumerate(WORDS)])
    mrpc = [[str(i % 2), str(i), str(i + 9), w, WORDS[-1 - i]] for i, w in enumerate(WORDS)]
    _write_glue(root, "MRPC", ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"], mrpc)
    stsb = [["g", "f", "y", str(i), "1", w, WORDS[-1 - i], f"{i * 0.6:.1f}"]
            for i, w in enumerate(WORDS)]
    _write_glue(root, "STS-B", ["genre", "filename", "year", "old_index", "source1",
                                "sentence1", "sentence2", "score"], stsb)
    rte = [[str(i), w, WORDS[-1 - i], ["entailment", "not_entailment"][i % 2]]
           for i, w in enumerate(WORDS)]
    _write_glue(root, "RTE", ["index", "sentence1", "sentence2", "label"], rte)


@pytest.mark.parametrize("task,metrics", [
    ("cola", {"matthews"}), ("sst2", {"accuracy"}), ("mrpc", {"accuracy", "f1"}),
    ("stsb", {"pearson", "spearman"}), ("rte", {"accuracy"}),
])
def test_glue_tasks_report_their_metrics(tmp_path, task, metrics):
    """Single-sentence (CoLA, SST-2) and sentence-pair (MRPC, STS-B, RTE) GLUE files train."""
    _glue_fixtures(tmp_path / "glue")
    config = FinetuneConfig(task=f"glue:{task}", data_dir=str(tmp_path / "glue"),
                            sketch="gaussian", ratio=0.5, out=str(tmp_path / "out"), **TINY)
    result = finetune.train(config)
    evals = result.evals
    assert set(evals.metric) == metrics | {"eval_loss"}
    assert sorted(evals.step.unique()) == [1, 2]
    assert evals.value.notna().all()
    row = result.run.iloc[0]
    assert row.metric == sorted(metrics)[0]
    assert row.task == f"glue:{task}" and row.n_eval == len(WORDS)
    written = pd.read_csv(tmp_path / "out" / finetune.run_name(config) / "evals.csv")
    assert set(written.metric) == set(evals.metric)


def test_config_carried_in_results(tmp_path):
    config = FinetuneConfig(task="synthetic", sketch="exact", seed=3, lr=5e-4,
                            out=str(tmp_path), **TINY)
    finetune.train(config)
    folder = tmp_path / finetune.run_name(config)
    row = pd.read_csv(folder / "run.csv").iloc[0]
    assert (row.model, row.task, row.sketch, row.seed, row.lr) == ("tiny-bert", "synthetic",
                                                                   "exact", 3, 5e-4)
    assert row.n_converted == 0 and row.total_steps == 2
    saved = json.loads((folder / "config.json").read_text())
    assert saved["betas"] == [0.9, 0.98] and saved["warmup"] == 0.06 and saved["device"] == "cpu"
    steps = pd.read_csv(folder / "steps.csv")
    assert list(steps.columns) == ["step", "loss", "lr", "time_s"] and len(steps) == 2
    assert steps.time_s.is_monotonic_increasing


def test_include_converts_a_subset(tmp_path):
    config = FinetuneConfig(task="synthetic", sketch="countsketch", ratio=0.1,
                            include=r"intermediate|output\.dense", exclude="attention", out=None,
                            **TINY)
    assert finetune.run(config).iloc[0].n_converted == 4  # 2 layers × (ffn_in, ffn_out)


def test_lr_schedule_warms_up_then_decays():
    import torch

    model = torch.nn.Linear(2, 2)
    opt, sched = finetune.make_optimizer(model, FinetuneConfig(lr=1.0, warmup=0.1), 20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == [0.5, 1.0, 1.0 * 18 / 18] and lrs[-1] == pytest.approx(1 / 18)
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0


@pytest.mark.parametrize("argv,needle", [
    (["--sketch", "fourier"], "valid choices: exact, gaussian"),
    (["--device", "tpu"], "valid choices: auto, cpu, cuda"),
    (["--dtype", "int8"], "valid choices: float32"),
    (["--ratio", "1.5"], "ratio must be in (0, 1]"),
    (["--preset", "huge"], "invalid choice 'huge'; valid choices: cpu, paper"),
    (["--task", "nope", "--model", "tiny-bert"], "valid choices: rotten_tomatoes, imdb"),
    (["--batch-size", "many"], "invalid int value"),
])
def test_cli_bad_values_one_line_exit_2(capsys, argv, needle):
    assert finetune.main(argv + ["--out", "none", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_none_clears_a_default(tmp_path, monkeypatch):
    """"--out none" means "write nothing", not "use the default folder"."""
    monkeypatch.chdir(tmp_path)
    assert finetune.main(["--model", "tiny-bert", "--task", "synthetic", "--batch-size", "4",
                          "--max-length", "16", "--max-steps", "1", "--out", "none",
                          "--no-progress"]) == 0
    assert not (tmp_path / "results").exists()


def test_cli_debug_raises():
    """--debug re-raises a bad value (a bad choice, like --sketch fourier, is a usage error that
    the parser answers with one line whatever --debug says)."""
    with pytest.raises(VarstudyError, match=r"ratio must be in \(0, 1\]"):
        finetune.main(["--ratio", "1.5", "--debug"])


def test_test_split_is_scored_at_each_new_best_validation_step():
    config = FinetuneConfig(task="synthetic", padding="dynamic", eval_examples=40,
                            **{**TINY, "max_steps": 6, "eval_every": 1, "lr": 1e-3})
    result = finetune.train(replace_out(config))
    evals = result.evals
    val = evals[evals.metric == "accuracy"].set_index("step").value
    tested = set(evals[evals.metric == "test_accuracy"].step)
    new_best = {s for s, v in val.items() if v > max(val[val.index < s], default=-1)}
    assert tested == new_best
    row = result.run.iloc[0]
    best = evals[(evals.metric == "test_accuracy") & (evals.step == row.best_step)]
    assert row.test_at_best == best.value.iloc[0] and row.n_test == 40
    assert row.padding == "dynamic"


def test_no_test_split_no_test_scores():
    config = FinetuneConfig(task="synthetic", test=False, eval_examples=20, **TINY)
    row = finetune.train(replace_out(config)).run.iloc[0]
    assert math.isnan(row.test_at_best) and row.n_test == 0


def replace_out(config):
    from dataclasses import replace
    return replace(config, out=None)


def test_cli_name_names_the_run_folder(tmp_path, capsys):
    """--name reaches the config (it once collided with preset()'s own parameter)."""
    assert finetune.main(["--model", "tiny-bert", "--task", "synthetic", "--batch-size", "4",
                          "--max-length", "16", "--max-steps", "1", "--name", "my-run",
                          "--out", str(tmp_path), "--no-progress"]) == 0
    assert (tmp_path / "my-run" / "run.csv").is_file()
    assert pd.read_csv(tmp_path / "my-run" / "run.csv").run.iloc[0] == "my-run"
    assert finetune.preset("paper", name="x").name == "x"


# The command-line convention (NOTE [one convention] in varstudy.cli) -------------------------


def test_cli_flags_lists_none_and_the_epochs_rule():
    config = finetune.parse(["--no-dropout", "--resume", "--betas", "0.8,0.9", "--out", "none",
                             "--eval-every", "none", "--no-test"])
    assert (config.dropout, config.resume, config.test) == (False, True, False)
    assert config.betas == (0.8, 0.9) and config.out is None and config.eval_every is None
    assert config.num_threads is None and config.plan is None  # torch's default; no plan
    assert finetune.parse([]) == FinetuneConfig()
    alone = finetune.parse(["--epochs", "2"])
    assert (alone.epochs, alone.max_steps) == (2.0, None)  # --epochs alone clears max_steps
    both = finetune.parse(["--epochs", "2", "--max-steps", "7"])
    assert (both.epochs, both.max_steps) == (2.0, 7)
    paper = finetune.parse(["--preset", "paper", "--lr", "3e-5"])
    assert paper == finetune.preset("paper", lr=3e-5) and paper.max_steps is None


@pytest.mark.parametrize("argv,needle", [
    (["--resume", "true"], "unrecognized arguments: true"),  # booleans are flags now
    (["--betas", "0.9"], "--betas takes 2 comma-separated values"),
    (["--num-threads", "0"], "num_threads must be > 0"),
    (["--plan", "missing-plan.json"], "cannot be read as JSON"),
    (["--replan-check"], "--replan-check needs --replan-every"),
    (["--replan-every", "0"], "replan_every must be an integer >= 1"),
    (["--replan-every", "5", "--sketch", "exact"], "re-plans a uniformly sketched model"),
    (["--replan-every", "5", "--sketch", "rows-real"], "does not support --sketch rows-real"),
])
def test_cli_convention_errors_are_one_line(capsys, argv, needle):
    assert finetune.main(argv + ["--out", "none"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_config_reruns_a_saved_run_and_options_override_it(tmp_path):
    config = FinetuneConfig(task="synthetic", sketch="rows", ratio=0.5, out=str(tmp_path),
                            **{**TINY, "max_steps": 1, "num_threads": None})
    finetune.train(config)
    saved = tmp_path / finetune.run_name(config) / "config.json"
    assert json.loads(saved.read_text())["threads"] >= 1  # the count in effect is recorded
    again = finetune.parse(["--config", str(saved)])
    assert again == FinetuneConfig(**{**config.__dict__, "device": "cpu"})  # device resolved
    changed = finetune.parse(["--preset", "paper", "--config", str(saved), "--seed", "4"])
    assert changed.seed == 4 and changed.model == "tiny-bert" and changed.max_steps == 1


def test_threads_set_for_the_run_then_restored_or_left_alone():
    import torch

    before = torch.get_num_threads()
    config = FinetuneConfig(task="synthetic", sketch="exact", out=None,
                            **{**TINY, "max_steps": 1, "num_threads": 1})
    result = finetune.train(config)
    assert torch.get_num_threads() == before
    assert result.run.num_threads.iloc[0] == 1 and result.config["threads"] == 1
    assert result.config["num_threads"] == 1
    default = finetune.train(FinetuneConfig(**{**config.__dict__, "num_threads": None}))
    assert torch.get_num_threads() == before
    assert default.run.num_threads.iloc[0] == before and default.config["num_threads"] is None


def test_run_table_keeps_its_columns():
    """run.csv is the study's runs.csv row: new options (plan) and config.json extras (threads)
    stay out of it, so a resumed study's tables keep their columns."""
    config = FinetuneConfig(task="synthetic", sketch="rows", ratio=0.5, out=None,
                            **{**TINY, "max_steps": 1})
    run = finetune.run(config)
    assert list(run.columns) == RUN_COLUMNS


RUN_COLUMNS = [
    "model", "task", "data_dir", "sketch", "ratio", "include", "exclude", "min_rows", "seed",
    "batch_size", "max_length", "padding", "lr", "epochs", "max_steps", "warmup", "weight_decay",
    "eps", "eval_every", "eval_examples", "test", "device", "dtype", "dropout", "out", "name",
    "num_threads", "run", "total_steps", "steps_per_epoch", "warmup_steps", "n_train", "n_eval",
    "n_test", "torch", "n_converted", "metric", "best_value", "best_step", "final_value",
    "test_at_best", "final_loss", "train_time_s", "examples_per_s", "saved_mib",
    "saved_linear_mib", "peak_cuda_mib"]


def test_help_imports_nothing_heavy():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "varstudy.finetune",
                           "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--resume, --no-resume" in proc.stdout
    assert "--betas B1,B2" in proc.stdout and "(default: 0.9,0.98)" in proc.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")]
    assert "varstudy.finetune.config" in imported
    heavy = [m for m in imported if m.split(".")[0] in ("torch", "transformers", "pandas")]
    assert not heavy


def test_save_model_reloads_as_the_trained_model(tmp_path, monkeypatch):
    """--save-model writes a Hugging Face folder that load_model reads back parameter for
    parameter (a randomized model saves plain nn.Linear weights)."""
    import torch

    from varstudy.finetune import training
    from varstudy.models import load_model

    kept = {}
    real = training.save_model
    def saving(model, name, folder, progress):
        from transformers.utils import logging as hf_logging

        kept["m"] = model
        real_save = model.save_pretrained
        model.save_pretrained = lambda *a, **k: (kept.setdefault(
            "bar", hf_logging.is_progress_bar_enabled()), real_save(*a, **k))
        try:
            return real(model, name, folder, progress)
        finally:
            del model.save_pretrained

    monkeypatch.setattr(training, "save_model", saving)
    config = FinetuneConfig(task="synthetic", sketch="rows", ratio=0.5, save_model=True,
                            out=str(tmp_path), eval_examples=8, **{**TINY, "lr": 1e-3})
    finetune.train(config)
    again, tok = load_model(str(tmp_path / finetune.run_name(config) / "model"), seed=123)
    trained = dict(kept["m"].named_parameters())
    assert trained and all(torch.equal(p, trained[n]) for n, p in again.named_parameters())
    fresh, _ = load_model("tiny-bert", seed=0)
    assert not torch.equal(fresh.classifier.weight, again.classifier.weight)  # it trained
    assert tok("a b")["input_ids"]
    from transformers.utils import logging as hf_logging  # no bar with progress off, then back
    assert kept["bar"] is False and hf_logging.is_progress_bar_enabled()


def test_save_model_needs_an_output_folder():
    with pytest.raises(VarstudyError, match="save_model needs an output directory"):
        finetune.check(FinetuneConfig(save_model=True, out=None))
