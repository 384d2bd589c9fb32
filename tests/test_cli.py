"""One command-line convention (varstudy.cli): every command's options are documented,
booleans are flags, ``--help`` imports no heavy library, and the README's commands parse."""

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


def _readme_commands():
    """Every ``python -m varstudy...`` command in the README's code blocks (also after ``&&``)."""
    found, inside = [], False
    text = (ROOT / "README.md").read_text().replace("\\\n", "")  # as bash joins continued lines
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
    """Every module of varstudy/ and analysis/ is named in the README's layout block, and every
    folder the block names exists."""
    text = (ROOT / "README.md").read_text()
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
