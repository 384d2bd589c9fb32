"""One command-line convention (varstudy.cli): every command's options are documented,
booleans are flags, ``--help`` imports no heavy library, and the commands of the README and of
the documentation site (docs/) parse."""

import argparse
import dataclasses
import json
import re
import shlex
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from varstudy import cli, names

ROOT = Path(__file__).resolve().parents[1]

# (command line, module with parser()/parse(), config class)
COMMANDS = {
    "measure": ("varstudy.measure", "varstudy.measure.command", "MeasureConfig"),
    "finetune": ("varstudy.finetune", "varstudy.finetune.command", "FinetuneConfig"),
    "study": ("varstudy.study", "varstudy.study.command", "StudyConfig"),
    "plan": ("varstudy.plan", "varstudy.plan", "PlanConfig"),
    "bench layers": ("varstudy.bench layers", "varstudy.bench.layers", "LayerBenchConfig"),
    "bench measure": ("varstudy.bench measure", "varstudy.bench.measure", "BenchConfig"),
    "bench checkpoint": ("varstudy.bench checkpoint", "varstudy.bench.checkpoint",
                         "BenchConfig"),
    "bench gpu": ("varstudy.bench gpu", "varstudy.bench.gpu", "GpuBenchConfig"),
    "bench callback": ("varstudy.bench callback", "varstudy.bench.callback",
                       "CallbackBenchConfig"),
}


def _module(name):
    import importlib
    return importlib.import_module(name)


def _config_class(command):
    _, module, cls = COMMANDS[command]
    mod = _module(module)
    return getattr(mod, cls, None) or getattr(_module(module.rsplit(".", 1)[0] + ".config"), cls)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_is_documented_and_booleans_are_flags(command):
    parser = _module(COMMANDS[command][1]).parser()
    cls = _config_class(command)
    hints = typing.get_type_hints(cls)
    actions = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(cls):
        action = actions[f.name]
        assert action.help and len(action.help) > len("(default: x)") + 5, (command, f.name)
        assert "default:" in action.help, (command, f.name)
        if hints[f.name] is bool:
            assert isinstance(action, argparse.BooleanOptionalAction), (command, f.name)
            assert any(o.startswith("--no-") for o in action.option_strings)
        if f.metadata.get("choices"):
            assert "choices:" in action.help, (command, f.name)
        assert "``" not in action.help  # plain text, no reStructuredText
    assert "``" not in (parser.description or "")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_imports_no_heavy_library(command):
    """``--help`` answers without importing torch, transformers or pandas (README: its time)."""
    argv = [sys.executable, "-X", "importtime", "-m", *COMMANDS[command][0].split(), "--help"]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert not imported & {"torch", "transformers", "pandas"}, command


def test_names_mirror_the_registries():
    from varstudy.data import DATASETS, GLUE_TASKS
    from varstudy.models import list_models
    from varstudy.randomized.sketches import SKETCHES
    from varstudy.roles import SCOPES

    assert names.SKETCH_NAMES == tuple(SKETCHES)
    assert names.DATASET_NAMES == tuple(DATASETS)
    assert names.GLUE_TASK_NAMES == tuple(GLUE_TASKS)
    assert sorted(names.MODEL_NAMES) == list_models()
    assert names.SCOPES == SCOPES


DOC_PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").rglob("*.md")
                                          if "_build" not in p.parts)]


def _readme_commands():
    """Every ``python -m varstudy...`` command in the code blocks of the README and of the docs
    pages (also after ``&&``)."""
    found, inside = [], False
    text = "\n".join(p.read_text() for p in DOC_PAGES).replace("\\\n", "")  # bash joins lines
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
            continue
        if not inside:
            continue
        for part in line.split("&&"):
            part = part.split(" #")[0].strip()
            if part.startswith("python -m varstudy"):
                found.append(part)
    return found


def test_the_readme_has_commands():
    assert len(_readme_commands()) >= 10


@pytest.mark.parametrize("line", _readme_commands())
def test_readme_commands_parse(line, monkeypatch):
    """Each README command line is accepted by its command's parser and makes a valid config
    (nothing runs; $VARS are given a value)."""
    monkeypatch.setenv("GLUE_DIR", "/tmp")
    words = shlex.split(line.replace("$GLUE_DIR", "/tmp"))
    target = words[2]
    args = words[3:]
    module = {"varstudy.bench": None}.get(target, target)
    if target == "varstudy.bench":
        module, args = f"varstudy.bench.{args[0]}", args[1:]
    parse = _module(module).parse if module == "varstudy.plan" else \
        getattr(_module(module), "parse")
    try:
        parse(args)
    except SystemExit as stop:  # argparse: a usage error
        pytest.fail(f"{line!r} does not parse (exit {stop.code})")


def test_config_json_reruns_a_measure_run(tmp_path):
    """--config takes every option from a saved config.json; given options override it."""
    from varstudy.measure.command import parse

    saved = dataclasses.asdict(parse(["--model", "tiny-bert", "--ratios", "0.3", "--no-fpc"]))
    saved.update(population=123.0, world_size=1)  # resolved extras are ignored
    path = tmp_path / "config.json"
    path.write_text(json.dumps(saved))
    again = parse(["--config", str(path)])
    assert again.model == "tiny-bert" and again.ratios == (0.3,) and again.fpc is False
    assert parse(["--config", str(path), "--fpc"]).fpc is True
    with pytest.raises(Exception, match="cannot be read as JSON"):
        parse(["--config", str(tmp_path / "missing.json")])


def test_usage_errors_are_one_line_with_valid_choices(capsys):
    parser = cli.config_parser(_config_class("measure"), "prog", "description")
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["--dataset", "mnist"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error:") and "valid choices: rotten_tomatoes" in err


def test_readme_layout_block_matches_the_tree():
    """Every module of varstudy/ and analysis/ is named in the layout block of the docs'
    contributing page, and every folder the block names exists."""
    text = (ROOT / "docs" / "contributing.md").read_text()
    block = text[text.index("```\nvarstudy/"):]
    block = block[:block.index("```", 4)]
    words = set(re.findall(r"[A-Za-z_]+", block))
    for folder in ("varstudy", "analysis"):
        for path in (ROOT / folder).rglob("*.py"):
            stem = path.stem if path.stem not in ("__init__", "__main__") else path.parent.name
            base = stem.split("_run")[0].split("_parts")[0].split("_tables")[0].split("_stages")[0]
            assert stem in words or base in words, f"{path.relative_to(ROOT)} not in the layout"
    for name in re.findall(r"^\s*([a-z]+)/", block, re.M):
        assert (ROOT / name).is_dir() or (ROOT / "varstudy" / name).is_dir(), name


def test_readme_and_reproduction_link_only_files_that_exist():
    """Every figure, table and result path the README and REPRODUCTION.md link to is in the
    tree (a clean clone has only committed files)."""
    missing = []
    for doc in ("README.md", "REPRODUCTION.md"):
        text = (ROOT / doc).read_text()
        for path in re.findall(r"\]\(((?:figures|results|notebooks)/[^)\s]+)\)", text):
            if not (ROOT / path).exists():
                missing.append(f"{doc}: {path}")
    assert not missing, missing


# Typed config.json (NOTE [typed configs] in varstudy.cli) ---------------------------------------

TYPED = [  # (key, JSON value, words of the one line)
    ("fpc", "false", 'fpc is a string "false", not true or false; valid choices: true or false'),
    ("fpc", 0, "fpc is an integer 0, not true or false"),
    ("batch_size", 3.5, "batch_size is a number 3.5, not an integer; valid choices: an integer"),
    ("batch_size", True, "batch_size is a boolean true, not an integer"),
    ("batch_size", "4", 'batch_size is a string "4", not an integer'),
    ("batch_size", None, "batch_size is null, not an integer; valid choices: an integer"),
    ("num_threads", 2.0, "num_threads is a number 2.0, not an integer; valid choices: an "
                         "integer, or null"),
    ("lr", "1e-5", 'lr is a string "1e-5", not a number'),
    ("lr", 10**400, "lr is an integer 1000000000"),
    ("model", {"name": "tiny-bert"}, 'model is an object {"name": "tiny-bert"}, not a string'),
    ("model", ["tiny-bert"], 'model is a list ["tiny-bert"], not a string'),
    ("dataset", "mnist", 'dataset is a string "mnist", not a valid choice; valid choices: '
                         "rotten_tomatoes"),
    ("train_sketch", "nope", "valid choices: gaussian, rademacher"),
    ("ratios", 0.5, "ratios is a number 0.5, not a list of numbers; valid choices: a list of "
                    "numbers"),
    ("ratios", [0.5, "0.1"], 'ratios[1] is a string "0.1", not a number'),
    ("ratios", [[0.5]], "ratios[0] is a list [0.5], not a number"),
    ("families", "rows", "families is a string \"rows\", not a list of strings; valid choices: "
                         "a list of strings among gaussian"),
    ("families", ["rows", "nope"], 'families[1] is a string "nope", not a valid choice'),
    ("measure_at", [0, 1.5], "measure_at[1] is a number 1.5, not an integer"),
    ("out", "a\u0000b", "holding a NUL character or an unpaired surrogate"),
    ("data_dir", "a\ud800b", "holding a NUL character or an unpaired surrogate"),
]


@pytest.mark.parametrize("key, value, words", TYPED, ids=[f"{k}={v!r}" for k, v, _ in TYPED])
def test_config_json_is_typed_like_the_command_line(key, value, words, tmp_path):
    """A config.json value of the wrong JSON type is refused with one line naming the file,
    the key, the value and the valid choices (never taken by truthiness)."""
    from varstudy.errors import VarstudyError
    from varstudy.measure.command import parse

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model": "tiny-bert", key: value}))
    with pytest.raises(VarstudyError) as err:
        parse(["--config", str(path)])
    line = str(err.value)
    assert line.startswith(f"--config {path}: {key}") and words in line, line
    assert "\n" not in line and "valid choices: " in line


def test_config_json_values_of_the_right_type_are_taken(tmp_path):
    """Every hint kind in one file: null for optionals, lists for tuples, an integer for a
    float field, NaN-free numbers; the result equals the command line's."""
    from varstudy.finetune.command import parse

    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(model="tiny-bert", betas=[0.8, 0.9], ratio=1, max_steps=None,
                                    epochs=2, eval_every=None, test=False, name="x")))
    got = parse(["--config", str(path)])
    assert got == parse(["--model", "tiny-bert", "--betas", "0.8,0.9", "--ratio", "1",
                         "--epochs", "2", "--eval-every", "none", "--no-test", "--name", "x"])
    assert got.betas == (0.8, 0.9) and isinstance(got.ratio, float)
    path.write_text(json.dumps(dict(betas=[0.9])))  # a fixed-length tuple keeps its length
    with pytest.raises(Exception, match=r"betas is a list \[0.9\], not a list of 2 numbers"):
        parse(["--config", str(path)])


@pytest.mark.parametrize("command", list(COMMANDS))
def test_command_names_match_the_command_line(command):
    """config.json's "command" key is the command line's words after varstudy."""
    assert cli.command_name(_config_class(command)) == command


@pytest.mark.parametrize("writer, reader", [("finetune", "measure"), ("bench layers", "study"),
                                            ("measure", "bench measure"), ("study", "finetune")])
def test_another_commands_config_is_refused(writer, reader, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"command": writer, "model": "tiny-bert", "seed": 1}))
    with pytest.raises(Exception) as err:
        _module(COMMANDS[reader][1]).parse(["memory"] * (reader == "study")
                                           + ["--config", str(path)])
    assert str(err.value) == (f'--config {path} was written by "{writer}", not by {reader}; '
                              f"valid choices: a config.json of a {reader} run")


def test_a_config_without_command_falls_back_to_the_key_overlap(tmp_path):
    """Configs written before the "command" key still rerun when they share a field; one
    sharing none is refused."""
    from varstudy.measure.command import parse

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model": "tiny-bert", "population": 3.0}))
    assert parse(["--config", str(path)]).model == "tiny-bert"
    path.write_text(json.dumps({"ns": [1, 2], "wave_n": 3}))
    with pytest.raises(Exception, match="holds none of this command's options"):
        parse(["--config", str(path)])
    path.write_text("[" * 100_000)  # nesting past the parser's recursion limit: one line too
    with pytest.raises(Exception, match="cannot be read as JSON"):
        parse(["--config", str(path)])


def test_a_written_config_names_its_command_and_reruns(tmp_path):
    """A real run's config.json carries "command" and reruns through --config; another
    command refuses it."""
    from varstudy import finetune
    from varstudy.measure import command as measure_command

    out = tmp_path / "m"
    argv = ["--model", "tiny-bert", "--dataset", "synthetic", "--batch-size", "4",
            "--max-length", "16", "--num-batches", "1", "--families", "rows", "--ratios", "0.5",
            "--mc-draws", "0", "--no-fpc", "--no-progress", "--out", str(out)]
    assert measure_command.main(argv) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["command"] == "measure" and saved["fpc"] is False
    again = measure_command.parse(["--config", str(out / "config.json")])
    assert again.resolved() == measure_command.parse(argv).resolved()
    with pytest.raises(Exception, match='written by "measure", not by finetune'):
        finetune.parse(["--config", str(out / "config.json")])


def test_an_allocation_no_machine_has_is_one_line(capsys):
    """A size that cannot be allocated (1 EiB, past any address space) is one line and status 2,
    not a traceback; other RuntimeErrors stay tracebacks (they are defects), and --debug
    re-raises."""
    import torch

    def huge():
        torch.empty(2**60, dtype=torch.uint8)

    assert cli.guarded(huge) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: out of memory")
    assert "valid choices: smaller sizes" in err
    assert cli.guarded(lambda: (_ for _ in ()).throw(MemoryError())) == 2
    with pytest.raises(RuntimeError, match="a defect"):
        cli.guarded(lambda: (_ for _ in ()).throw(RuntimeError("a defect")))
    with pytest.raises(RuntimeError):
        cli.guarded(huge, debug=True)
