"""The command-line error convention shared by every ``python -m varstudy.*`` command.

A bad input ends the command with exit status 2 and one line on stderr, ``error: <what was wrong;
valid choices>``, without a traceback; ``--debug`` re-raises instead. Usage errors found by
argparse (unknown option, non-numeric value) follow the same convention through :class:`Parser`.
An interrupted run (Ctrl-C) exits 130 with one line pointing at ``--resume``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from varstudy.errors import VarstudyError


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors and exit status 2."""

    def error(self, message: str):
        print(f"error: {one_line(message)}", file=sys.stderr)
        raise SystemExit(2)


def one_line(message: object) -> str:
    return " ".join(str(message).split())


def guarded(body: Callable[[], int | None], *, debug: bool = False) -> int:
    """Run ``body``; a VarstudyError (or an OSError from the file system) becomes one line on
    stderr and status 2 (re-raised with ``debug``); Ctrl-C becomes status 130."""
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
