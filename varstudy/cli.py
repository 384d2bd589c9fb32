"""The command-line convention shared by every ``python -m varstudy.*`` command.

NOTE [one convention]: a command is a frozen config dataclass whose fields are declared with
:func:`option` (a default, a one-line help text, optional choices). :func:`config_parser` turns it
into an argparse parser with one option per field:

* ``--x/--no-x`` flags for booleans;
* comma lists for tuples (``--ratios 0.1,0.2``; ``--betas 0.9,0.98``), each element checked;
* ``none`` for optional values (``--layers none``);
* help text from the field's documentation, with its default and its valid choices, plain text;
* ``--config results/<run>/config.json`` to rerun a saved run exactly (options given on the
  command line override it; keys of the JSON that are not fields, such as resolved extras, are
  ignored; the fields are typed like the command line's, and another command's config is
  refused: NOTE [typed configs]), ``--preset`` where a command has presets, ``--debug`` for
  tracebacks.

Parsing imports nothing heavy: config modules import neither torch, transformers nor pandas,
so ``--help`` answers at once.

Why written here rather than taken from a library: tyro, jsonargparse and simple-parsing all
derive parsers from dataclasses and produce good help, but each adds dependencies
(docstring_parser, typeguard, PyYAML, typing_extensions) and costs 210–320 ms to import
against argparse's 37 ms (measured on the development machine, Python 3.11); what varstudy
needs (flags, comma lists, none, --config) is about 150 lines on argparse.

Errors: a bad input ends the command with exit status 2 and one line on stderr,
``error: <what was wrong>; valid choices: ...``, without a traceback; ``--debug`` re-raises.
An interrupted run (Ctrl-C) exits 130 with one line pointing at ``--resume``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Sequence

from varstudy.errors import VarstudyError


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors and exit status 2."""

    def error(self, message: str):
        # argparse says "invalid choice: 'x' (choose from 'a', 'b')"; the house style lists them
        message = re.sub(r"invalid choice: (.*?) \(choose from (.*)\)",
                         lambda m: f"invalid choice {m.group(1)}; valid choices: "
                                   f"{m.group(2).replace(chr(39), '')}", message)
        print(f"error: {one_line(message)}", file=sys.stderr)
        raise SystemExit(2)


def one_line(message: object) -> str:
    """``message`` as text on one line (runs of whitespace become one space)."""
    return " ".join(str(message).split())


def guarded(body: Callable[[], int | None], *, debug: bool = False) -> int:
    """Run ``body``; a VarstudyError (or an OSError from the file system, or an allocation that
    fails: :func:`out_of_memory`) becomes one line on stderr and status 2 (re-raised with
    ``debug``); Ctrl-C becomes status 130."""
    try:
        return int(body() or 0)
    except (VarstudyError, OSError) as err:
        if debug:
            raise
        what = err if isinstance(err, VarstudyError) else \
            f"{err.strerror or err} ({getattr(err, 'filename', None) or 'file system'})"
        print(f"error: {one_line(what)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted; finished work is kept, rerun with --resume to continue",
              file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as err:
        if debug or not out_of_memory(err):
            raise
        print(f"error: out of memory ({one_line(err)[:160]}); valid choices: smaller sizes "
              "(batch, length, hidden, grid), or a machine with more memory", file=sys.stderr)
        return 2


def out_of_memory(err: BaseException) -> bool:
    """True for an allocation failure: MemoryError, torch's OutOfMemoryError (CUDA) or its CPU
    allocator's RuntimeError ("can't allocate memory"), a size asked for that no machine has."""
    return isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" \
        or "can't allocate memory" in str(err)


SIZE_LIMIT = 2**31 - 1  # a tensor dimension torch indexes with 32-bit integers
SEED_LIMIT = 2**63  # seeds feed torch.manual_seed and numpy generators: 0 <= seed < 2**63


def check_seed(name: str, seed) -> None:
    """Raise a VarstudyError unless ``seed`` is an integer in [0, 2**63)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise VarstudyError(f"{name} {seed!r} is out of range; valid: integers with "
                            f"0 <= {name} < 2**63")


def check_distinct(name: str, values) -> None:
    """Raise a VarstudyError when a list option names one value twice (``--ratios 0.1,0.1``
    would count that configuration twice in every total and narrow its intervals)."""
    seen = set()
    for v in values:
        if v in seen:
            raise VarstudyError(f"{name} lists {v!r} more than once ({', '.join(map(str, values))}"
                                f"); valid choices: distinct values")
        seen.add(v)


def wants_debug(argv) -> bool:
    """True when ``--debug`` is among the raw arguments (for errors raised while parsing)."""
    return "--debug" in list(sys.argv[1:] if argv is None else argv)


# --------------------------------------------------------------------------------------------
# Config dataclass -> command line (NOTE [one convention])
# --------------------------------------------------------------------------------------------


def option(default: Any = dataclasses.MISSING, help: str = "", *,  # noqa: A002 - argparse's name
           choices: Sequence[str] | None = None, metavar: str | None = None,
           flag: str | None = None):
    """A config field with its command-line documentation: a one-line ``help`` (plain text),
    the valid ``choices`` of a string (or of each element of a list), and its ``flag`` when it
    is not ``--`` + the field name with dashes (``--from`` for a field ``source``)."""
    return dataclasses.field(default=default, metadata=dict(help=help, choices=choices,
                                                            metavar=metavar, flag=flag))


def _split(hint) -> tuple[Any, bool]:
    """(inner type, optional) of a type hint ``T`` or ``T | None``."""
    args = typing.get_args(hint)
    if (typing.get_origin(hint) in (typing.Union, types.UnionType)) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return hint, False


def _scalar(kind, choices, in_list: bool = False) -> Callable[[str], Any]:
    def convert(text: str):
        try:
            value = kind(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma list of {kind.__name__}, got {text!r}" if in_list
                else f"invalid {kind.__name__} value {text!r}") from None
        if choices is not None and value not in choices:
            raise argparse.ArgumentTypeError(
                f"invalid choice {text!r}; valid choices: {', '.join(choices)}")
        return value
    return convert


def converter(hint, choices=None, name: str = "option") -> Callable[[str], Any]:
    """str -> value for a field of type ``hint``: scalars, ``T | None`` ("none" or "" is None),
    ``tuple[T, ...]`` and fixed-length ``tuple[T1, T2]`` as comma lists."""
    inner, optional = _split(hint)
    if typing.get_origin(inner) is tuple:
        args = typing.get_args(inner)
        var = len(args) == 2 and args[1] is Ellipsis
        item = _scalar(args[0], choices, in_list=True)

        def convert_list(text: str):
            parts = [t for t in text.split(",") if t.strip()]
            if not var and len(parts) != len(args):
                raise argparse.ArgumentTypeError(
                    f"--{name} takes {len(args)} comma-separated values, got {text!r}")
            return tuple(item(t) for t in parts)
        base = convert_list
    else:
        base = _scalar(inner, choices)
    if not optional:
        return base

    def convert_optional(text: str):
        return None if text.strip().lower() in ("none", "") else base(text)
    return convert_optional


def _shown(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) if value else "(empty)"
    return str(value)


def add_config_options(parser: argparse.ArgumentParser, cls) -> None:
    """One option per field of dataclass ``cls`` (NOTE [one convention]); absent options stay
    out of the namespace (argparse.SUPPRESS), so a preset or --config can fill them."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        choices = meta.get("choices")
        default = f.default if f.default is not dataclasses.MISSING else None
        text = meta.get("help") or f.name.replace("_", " ")
        shown = ("on" if default else "off") if isinstance(default, bool) else _shown(default)
        extra = f"default: {shown}"
        if choices:
            extra += f"; choices: {', '.join(choices)}"
        help_text = f"{text} ({extra})".replace("%", "%%")
        if hints[f.name] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, dest=f.name,
                                default=argparse.SUPPRESS, help=help_text)
            continue
        parser.add_argument(flag, type=converter(hints[f.name], choices, flag[2:]),
                            default=argparse.SUPPRESS, help=help_text, dest=f.name,
                            metavar=meta.get("metavar") or f.name.upper())


def config_parser(cls, prog: str, description: str, *, presets: Sequence[str] = (),
                  positional: tuple[str, Sequence[str]] | None = None) -> "Parser":
    """The parser of a command whose options are the fields of ``cls``, plus ``--config``,
    ``--preset`` (when ``presets``), ``--debug`` and an optional positional choice."""
    usage = f"{prog}{' ' + positional[0].upper() if positional else ''} [options]"
    parser = Parser(prog=prog, description=description.replace("``", ""), usage=usage)
    if positional is not None:
        name, choices = positional
        parser.add_argument(name, choices=list(choices), help=f"one of {', '.join(choices)}")
    if presets:
        parser.add_argument("--preset", choices=list(presets), default=argparse.SUPPRESS,
                            help=f"a preset of the options (default: {presets[0]}; choices: "
                                 f"{', '.join(presets)})")
    parser.add_argument("--config", type=Path, default=argparse.SUPPRESS, metavar="CONFIG_JSON",
                        help="rerun a saved run: take every option from its config.json (options "
                             "given on the command line override it)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    add_config_options(parser, cls)
    return parser


# --------------------------------------------------------------------------------------------
# config.json -> options (NOTE [typed configs])
# --------------------------------------------------------------------------------------------
# NOTE [typed configs]: a saved config.json is read with the command line's types, never by
# truthiness: a field's JSON value must have the JSON type of its hint (true/false for bool, an
# integer for int, a number for float, a string for str, a list for a tuple, each element like a
# command-line list element, choices included; null only for ``T | None``). A config.json names
# the command that wrote it (``"command": "measure"``, :func:`command_name`); another command's
# config is refused. One written before that key is taken when it holds one of the fields.

COMMAND_KEY = "command"
_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def command_name(cls) -> str:
    """The command whose config class is ``cls``, as config.json records it: "measure",
    "finetune", "study", "plan", "bench layers", ..."""
    return cls.__module__.removeprefix("varstudy.").removesuffix(".config").replace(".", " ")


def _brief(value) -> str:
    text = json.dumps(value, ensure_ascii=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_kind(value) -> str:
    """'a string "false"', 'a number 3.5', 'a list [1, 2]', 'null': a JSON value for errors."""
    kinds = ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
             (list, "a list"), (dict, "an object"))
    kind = next((name for t, name in kinds if isinstance(value, t)), "a value")
    return "null" if value is None else f"{kind} {_brief(value)}"


def _json_scalar(kind, value, choices, where: str, valid: str):
    ok = {bool: lambda v: isinstance(v, bool), str: lambda v: isinstance(v, str),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)}[kind](value)
    if ok and kind is float:
        try:
            value = float(value)
        except OverflowError:  # an integer beyond float's range
            ok = False
    if not ok:
        raise VarstudyError(f"{where} is {_json_kind(value)}, not {_KINDS[kind]}; valid "
                            f"choices: {valid}")
    if kind is str and ("\0" in value or not _encodable(value)):  # no command line holds these
        raise VarstudyError(f"{where} is {_json_kind(value)} holding a NUL character or an "
                            f"unpaired surrogate; valid choices: {valid} without them")
    if choices is not None and value not in choices:
        raise VarstudyError(f"{where} is {_json_kind(value)}, not a valid choice; valid "
                            f"choices: {valid}")
    return value


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8", "surrogateescape")  # as os.fsencode: a command line's odd bytes
        return True
    except UnicodeEncodeError:
        return False


def json_value(hint, value, choices, where: str):
    """A field's value from a config.json, checked against its type ``hint`` and ``choices``
    like the command line's text (NOTE [typed configs]); ``where`` starts the error line."""
    inner, optional = _split(hint)
    if value is None and optional:
        return None
    args = typing.get_args(inner) if typing.get_origin(inner) is tuple else None
    item = args[0] if args else inner
    valid = ", ".join(map(str, choices)) if choices else _KINDS[item]
    if args is not None:
        size = "" if len(args) == 2 and args[1] is Ellipsis else f"{len(args)} "
        plural = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}[item]
        if not isinstance(value, list) or (size and len(value) != len(args)):
            raise VarstudyError(
                f"{where} is {_json_kind(value)}, not a list of "
                f"{size}{plural}; valid choices: a list of {size}{plural}"
                f"{f' among {valid}' if choices else ''}{', or null' if optional else ''}")
        return tuple(_json_scalar(item, v, choices, f"{where}[{i}]", valid)
                     for i, v in enumerate(value))
    return _json_scalar(inner, value, choices, where, valid + (", or null" if optional else ""))


def config_options(data: dict, cls, source: str) -> dict:
    """The fields of ``cls`` in the object ``data`` of a config.json (other keys ignored), typed
    (NOTE [typed configs]); ``source`` names the file in errors ("--config run/config.json")."""
    expected, written = command_name(cls), data.get(COMMAND_KEY)
    if COMMAND_KEY in data and written != expected:
        raise VarstudyError(f"{source} was written by {_brief(written)}, not by {expected}; "
                            f"valid choices: a config.json of a {expected} run")
    fields = dataclasses.fields(cls)
    if COMMAND_KEY not in data and not {f.name for f in fields} & set(data):
        raise VarstudyError(f"{source} holds none of this command's options; valid choices: a "
                            f"config.json of a {expected} run")
    hints = typing.get_type_hints(cls)
    return {f.name: json_value(hints[f.name], data[f.name], f.metadata.get("choices"),
                               f"{source}: {f.name}") for f in fields if f.name in data}


def saved_options(path: Path, cls, role: str = "--config") -> dict:
    """The typed fields of ``cls`` in a saved ``config.json`` (:func:`config_options`)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # JSON and UTF-8 errors are ValueErrors
        raise VarstudyError(f"{role} {path} cannot be read as JSON ({one_line(err)[:200]}); "
                            "valid choices: a config.json written by a varstudy run") from None
    if not isinstance(data, dict):
        raise VarstudyError(f"{role} {path} is not a JSON object; valid choices: a config.json "
                            "written by a varstudy run")
    return config_options(data, cls, f"{role} {path}")


def config_from(cls, args: argparse.Namespace, presets: dict[str, dict] | None = None) -> Any:
    """defaults <- preset <- --config file <- options given on the command line."""
    values: dict = {}
    if presets is not None:
        values.update(presets[getattr(args, "preset", next(iter(presets)))])
    if getattr(args, "config", None) is not None:
        values.update(saved_options(args.config, cls))
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                   if hasattr(args, f.name)})
    return cls(**values)


def run_command(body: Callable[[], int | None], argv) -> int:
    """:func:`guarded` with ``--debug`` read from the raw arguments; a usage error (2) or
    ``--help`` (0) found while parsing is returned as the status, not raised."""
    try:
        return guarded(body, debug=wants_debug(argv))
    except SystemExit as stop:
        return int(stop.code or 0) if not isinstance(stop.code, str) else 2


THREADS_LIMIT = 1024  # torch.set_num_threads overflows past 2**31; a thousand is past any CPU


def set_threads(num_threads: int | None) -> int:
    """Use ``num_threads`` CPU threads in torch (None: torch's default, the machine's cores);
    returns the count in effect, for env.json."""
    import torch

    if num_threads is not None:
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) \
                or not 1 <= num_threads <= THREADS_LIMIT:
            raise VarstudyError(f"num_threads must be an integer in [1, {THREADS_LIMIT}], got "
                                f"{num_threads!r}; valid choices: 1 .. the machine's cores, or "
                                "none")
        torch.set_num_threads(num_threads)
    return torch.get_num_threads()
