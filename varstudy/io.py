"""Durable result files: atomic writes, append-only chunks, writability checks, checkpoints.

NOTE [durability]: a final file is written to a temporary file in the same directory, flushed,
fsynced and moved into place with ``os.replace``, so its name appears only once its content is
complete; a crash leaves the old file (or none) and at worst a stray ``.tmp-*`` file. Chunk files
(one row group per finished unit of work) are appended with one ``write`` per unit followed by an
fsync; a crash may leave a trailing partial line, which :func:`read_chunk` drops. Every OSError
(no space left, permission denied, ...) becomes a one-line :class:`VarstudyError` naming the file.

All bytes go through :func:`_write`, so tests can inject failures (``OSError(ENOSPC)``) there.
New files get the mode the user's umask gives any new file (0666 & ~umask), like ``open``.

NOTE [one run per folder]: a command holds :func:`output_lock` on its output folder for the whole
run (``fcntl.flock`` on ``<folder>/.lock``, non-blocking); a second run on the same folder stops
with one line naming the holder's pid instead of appending duplicate rows next to the first.
The OS drops the lock when its process ends, however it ends, so a crash never leaves the folder
locked (at most an unlocked ``.lock`` file, reused by the next run); a run that ends normally,
with or without an error, removes the file.
"""

from __future__ import annotations

import io
import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from varstudy.errors import VarstudyError

if TYPE_CHECKING:  # pandas is imported where a table is read (io stays light for --help)
    import pandas as pd


def _write(fd: int, data: bytes) -> None:
    """Write all of ``data`` to file descriptor ``fd`` (the single low-level writer)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fail(action: str, path: Path | str, err: OSError) -> VarstudyError:
    why = err.strerror or str(err)
    return VarstudyError(f"{action} {path} failed: {why}; valid choices: free space, fix the "
                         "permissions, or choose another output directory (--out)")


@contextmanager
def _wrapped(action: str, path):
    try:
        yield
    except OSError as err:
        raise _fail(action, path, err) from err


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - some file systems refuse directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _new_temp(folder: Path, prefix: str) -> tuple[int, str]:
    """Create a new file ``folder/prefix<random>`` for writing: (fd, path).

    Unlike ``tempfile.mkstemp`` (always 0600) the mode is 0666 less the umask, so a table moved
    into place has the permissions any new file of the user has.
    """
    while True:
        tmp = str(folder / f"{prefix}{secrets.token_hex(6)}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, fsync, replace)."""
    path = Path(path)
    with _wrapped("writing", path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _new_temp(path.parent, f".tmp-{path.name}.")
        try:
            try:
                _write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with _ignored():
                os.unlink(tmp)
            raise
        _fsync_dir(path.parent)
    return path


@contextmanager
def _ignored():
    try:
        yield
    except OSError:
        pass


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, data: dict) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def atomic_write_csv(path, frame: pd.DataFrame, **to_csv) -> Path:
    """``frame.to_csv(path, index=False, **to_csv)``, atomically."""
    return atomic_write_text(path, frame.to_csv(index=False, **to_csv))


def atomic_torch_save(path, obj) -> Path:
    """``torch.save(obj, path)`` atomically (checkpoints)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path) -> dict:
    """A checkpoint written by :func:`atomic_torch_save`; a truncated or corrupt file is a
    one-line VarstudyError naming it."""
    import torch

    with _wrapped("reading", path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=False)
        except OSError:
            raise
        except Exception as err:  # noqa: BLE001 - zip, pickle and EOF errors of a damaged file
            raise VarstudyError(
                f"checkpoint {path} is unreadable ({type(err).__name__}: "
                f"{' '.join(str(err).split())[:200]}); valid choices: delete it and rerun (the "
                "run starts over from its last finished part), or rerun without --resume") \
                from None
    if not isinstance(saved, dict):
        raise VarstudyError(f"checkpoint {path} holds a {type(saved).__name__}, not a "
                            "checkpoint; valid choices: delete it, or rerun without --resume")
    return saved


def read_json(path) -> dict:
    """A JSON object written by :func:`atomic_write_json` (a resumed run's config), or a one-line
    VarstudyError naming the file when it is not valid JSON."""
    with _wrapped("reading", path):
        text = Path(path).read_bytes()
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as err:
        raise VarstudyError(f"{path} is not valid JSON ({' '.join(str(err).split())}); valid "
                            "choices: rerun without --resume (start over), or another --out") \
            from None
    if not isinstance(data, dict):
        raise VarstudyError(f"{path} holds a JSON {type(data).__name__}, not an object; valid "
                            "choices: rerun without --resume (start over), or another --out")
    return data


def append_csv(path, frame: pd.DataFrame) -> Path:
    """Append ``frame``'s rows (header first when the file is new or empty) in one write, fsynced.

    Only whole lines are written; a crash mid-write leaves at most a trailing partial line,
    which :func:`read_chunk` drops.
    """
    path = Path(path)
    with _wrapped("appending to", path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            header = os.fstat(fd).st_size == 0
            _write(fd, frame.to_csv(index=False, header=header).encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def read_chunk(path) -> pd.DataFrame | None:
    """Rows of a chunk file without a trailing partial line; None when missing or empty."""
    path = Path(path)
    if not path.is_file():
        return None
    with _wrapped("reading", path):
        data = path.read_bytes()
    end = data.rfind(b"\n")
    if end < 0:  # not even a whole header line
        return None
    whole = data[:end + 1]
    if whole.count(b"\n") < 2:
        return None
    import pandas as pd

    return pd.read_csv(io.BytesIO(whole))


def whole_lines(path) -> list[str]:
    """The lines of a chunk file up to its last newline (a trailing partial line dropped), each
    with its newline, undecodable bytes replaced; [] when the file is missing."""
    path = Path(path)
    if not path.is_file():
        return []
    with _wrapped("reading", path):
        data = path.read_bytes()
    text = data[:data.rfind(b"\n") + 1].decode("utf-8", "replace")
    return [line + "\n" for line in text.split("\n")[:-1]]


def trim_partial_line(path) -> None:
    """Cut a trailing partial line (an append interrupted mid-write) off a chunk file."""
    path = Path(path)
    if not path.is_file():
        return
    with _wrapped("repairing", path):
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            os.truncate(path, data.rfind(b"\n") + 1)


def check_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and prove that a file can be written there, or raise."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise VarstudyError(f"output directory {folder} is an existing file; valid choices: a "
                            "directory path (--out)")
    with _wrapped("writing a test file to output directory", folder):
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = _new_temp(folder, ".tmp-writable.")
        try:
            _write(fd, b"ok\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            with _ignored():
                os.unlink(tmp)
    return folder


def require_out(out) -> None:
    """Refuse an empty output path: ``Path("")`` is the current directory, which is never meant."""
    if out is None or not str(out).strip():
        shown = "(none)" if out is None else repr(out)
        raise VarstudyError(f"output directory --out {shown} is empty; valid choices: a "
                            "directory path (--out . for the current directory)")


@contextmanager
def output_lock(folder: str | os.PathLike, name: str = ".lock"):
    """Hold the exclusive lock of output folder ``folder`` for the block (NOTE [one run per
    folder]); raise a one-line VarstudyError naming the holder's pid when another run has it."""
    import fcntl

    folder = Path(folder)
    path = folder / name
    while True:
        with _wrapped("locking", path):
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise VarstudyError(f"output directory {folder} is in use by another run (pid "
                                f"{holder}); valid choices: wait for it, or another --out") \
                from None
        except OSError as err:
            os.close(fd)
            raise _fail("locking", path, err) from err
        try:  # the holder before us may have removed the file between our open and flock
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        pid = f"{os.getpid()}\n".encode()
        os.pwrite(fd, pid, 0)
        os.ftruncate(fd, len(pid))
        yield path
    finally:
        with _ignored():
            os.unlink(path)  # still locked: a run that opened it now sees another file
        os.close(fd)


def remove(*paths) -> None:
    """Delete files that may or may not exist (stale final tables before a new run)."""
    for p in paths:
        with _ignored():
            Path(p).unlink()


def config_diff(old: dict, new: dict, ignore=()) -> list[str]:
    """Keys whose JSON-normalised values differ between two resolved configs."""
    norm = json.loads(json.dumps({"o": old, "n": new}, default=str))
    o, n = norm["o"], norm["n"]
    keys = sorted((set(o) | set(n)) - set(ignore))
    return [k for k in keys if o.get(k) != n.get(k)]


def refuse_changed(path, old: dict, new: dict, ignore=()) -> None:
    """Raise when ``--resume`` meets a run in ``path`` made with a different config."""
    diff = config_diff(old, new, ignore)
    if diff:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:4])
        raise VarstudyError(f"--resume with a different config than the run in {path} "
                            f"({shown}); valid choices: the same options, or no --resume "
                            "(start over), or another --out")


def env_info(device: str) -> dict:
    """Versions, device, threads and cores of this run, for env.json (no hostname)."""
    import platform

    import numpy as np
    import pandas as pd
    import torch
    import transformers

    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else \
        (platform.processor() or platform.machine())
    return dict(python=platform.python_version(), torch=torch.__version__,
                transformers=transformers.__version__, numpy=np.__version__,
                pandas=pd.__version__, platform=f"{platform.system()} {platform.machine()}",
                device=device, device_name=name, torch_threads=torch.get_num_threads(),
                cpu_count=os.cpu_count())
