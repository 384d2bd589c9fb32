"""Durable result files: atomic writes, append-only chunks, staged results, locks, checkpoints.

NOTE [durability]: a final file is written to a temporary file in the same directory, flushed,
fsynced and moved into place with ``os.replace``, so its name appears only once its content is
complete; a crash leaves the old file (or none) and at worst a stray ``.tmp-*`` file. Chunk files
(one row group per finished unit of work) are appended with one ``write`` per unit followed by an
fsync; a crash may leave a trailing partial line, which :func:`read_chunk` drops. Every OSError
(no space left, permission denied, ...) becomes a one-line :class:`VarstudyError` naming the file.

All bytes go through ``_write``, so tests can inject failures (``OSError(ENOSPC)``) there.
New files get the mode the user's umask gives any new file (0666 & ~umask), like ``open``.

NOTE [one run per folder]: a command holds :func:`output_lock` on its output folder for the whole
run (``fcntl.flock`` on ``<folder>/.lock``, non-blocking); a second run on the same folder stops
with one line naming the holder's pid instead of appending duplicate rows next to the first.
The OS drops the lock when its process ends, however it ends, so a crash never leaves the folder
locked (at most an unlocked ``.lock`` file, reused by the next run); a run that ends normally,
with or without an error, removes the file. The lock file is opened with ``O_NOFOLLOW``: a
``.lock`` that is a symlink or not a regular file is refused, never written through.

NOTE [staged results]: a finished result is replaced only by a finished result. Every command
writes into a staging folder (:func:`staged`): ``<parent>/.<name>.staging`` beside a folder it
replaces as a whole, or ``<out>/.<command>.staging/`` for the files it owns in a shared folder.
An interrupted or failed run leaves the finished result byte for byte and its own partial
state in the staging folder, where ``--resume`` continues; a run without ``--resume`` discards
only that staging folder; ``--resume`` with no staging folder starts from a copy of the finished
result. Once the run has finished, a mark is written and the result moves in: a whole folder
by one ``renameat2(RENAME_EXCHANGE)`` (two renames where the OS lacks it), a file set one
``os.replace`` per name (a name the new run no longer produces is removed). A crash after the
mark is rolled forward by the next run on that folder, so the folder never mixes two results.

NOTE [data, never code]: checkpoints load with ``torch.load(weights_only=True)`` (tensors and
plain containers only) and result folders are read as data: a folder handed over by someone
else can make a run refuse, never run code or write outside the folder through a symlink.
"""

from __future__ import annotations

import errno
import io
import json
import os
import secrets
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

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
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_write_bytes`); returns the
    path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, data: dict) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically; returns the path."""
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
            saved = torch.load(path, map_location="cpu", weights_only=True)  # data, never code
        except OSError:
            raise
        except Exception as err:  # noqa: BLE001 - zip, pickle and EOF errors of a damaged file
            why = (f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
                   if "weights only load failed" not in str(err).lower() else
                   "damaged, or it holds more than tensors and plain data; nothing in it was run")
            raise VarstudyError(
                f"checkpoint {path} is unreadable ({why}); valid choices: delete it and rerun "
                "(the run starts over from its last finished part), or rerun without --resume") \
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
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o666)
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
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)  # never truncate a link's target
            try:
                os.ftruncate(fd, data.rfind(b"\n") + 1)
            finally:
                os.close(fd)


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
        fd = _open_lock(folder, path)
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
        if _same_file(fd, path):  # the holder before us may have removed it meanwhile
            break
        os.close(fd)
    try:
        pid = f"{os.getpid()}\n".encode()
        os.pwrite(fd, pid, 0)
        os.ftruncate(fd, len(pid))
        yield path
    finally:
        if _same_file(fd, path):  # a published swap may have moved ours away: never unlink
            with _ignored():     # the lock file of a run that came after
                os.unlink(path)  # still locked: a run that opened it now sees another file
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.lstat(path))
    except FileNotFoundError:
        return False


def _open_lock(folder: Path, path: Path) -> int:
    """Open (create) lock file ``path`` without following a symlink; a ``.lock`` that is a
    symlink or not a regular file is refused (it is never written through)."""
    refused = VarstudyError(f"lock file {path} is a symlink or not a regular file; valid "
                            "choices: remove it (no run of varstudy makes one), or another --out")
    with _wrapped("locking", path):
        folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
                raise refused from None
            raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise refused
    return fd


STAGING = ".staging"  # suffix of a staging folder (NOTE [staged results])


def staging_path(final: str | os.PathLike, *, files=None, name: str | None = None) -> Path:
    """Where :func:`staged` stages ``final``: ``<parent>/.<final's name>.staging`` for a whole
    folder, ``<final>/.<name>.staging`` for a file set (``name`` defaults to the stem of the
    first file), so an interrupted run's state is found again by the next ``--resume``."""
    if files is None:
        final = _real(Path(final))
        return final.parent / f".{final.name}{STAGING}"
    return Path(final) / f".{name or Path(files[0]).stem}{STAGING}"


def resume_source(final, *, files=None, name: str | None = None) -> Path:
    """The folder whose state a ``--resume`` continues: the staging folder an interrupted run
    left, else ``final`` (which :func:`staged` copies); for checks made before the lock."""
    stage = staging_path(final, files=files, name=name)
    return stage if _is_dir(stage) else Path(final)


@contextmanager
def staged(final, *, resume: bool = False, files=None,
           name: str | None = None) -> Iterator[Path]:
    """Yield the staging folder to write into; publish on normal exit (files=None: the whole
    folder ``final`` is replaced; files=(names...): only those names inside folder ``final``
    are replaced, or removed where the staging folder has none; names may be paths such as
    ``chunks/step_000000.csv`` or folders); on an exception leave
    ``final`` untouched and keep the staging folder for --resume (NOTE [staged results]).

    The staging folder is, with ``resume``, the one an interrupted run left, else a copy of
    ``final`` (whole folder: all of it but locks and temporary files; file set: the names in
    ``files``; regular files and folders only, symlinks are skipped); without ``resume`` it
    starts empty (an old staging folder is discarded, ``final`` is not touched). Call it
    holding :func:`output_lock` of the folder that holds the result. ``files`` move into place
    in their order, so list the completion marker last; ``name`` names a file set's staging
    folder (``<final>/.<name>.staging``).
    """
    whole = files is None
    final = _real(Path(final)) if whole else Path(final)
    if whole and final.parent == final:
        raise VarstudyError(f"cannot replace {final} as a whole; valid choices: a folder "
                            "below it (--out)")
    stage = staging_path(final, files=files, name=name)
    with _wrapped("staging", stage):
        _recover(final, stage, files)
        if not resume or not _is_dir(stage):
            _discard(stage)
            stage.mkdir(parents=True)
            try:
                for entry in ([None] if whole else files) if resume and _is_dir(final) else ():
                    _copy(final if whole else final / entry, stage if whole else stage / entry)
            except BaseException:  # a half-made copy is no run's state
                shutil.rmtree(stage, ignore_errors=True)
                raise
    yield stage
    with _wrapped("publishing", final):
        if whole:
            ident = os.lstat(stage)
            atomic_write_json(_folder_mark(final), dict(dev=ident.st_dev, ino=ident.st_ino))
        else:
            present = [f for f in files if os.path.lexists(stage / f)]
            atomic_write_json(stage / _MARK, dict(present=present))
        _recover(final, stage, files)  # from the mark on, a crash rolls forward


_MARK = ".publishing.json"  # in a file set's staging folder: finished, being moved into place


def _folder_mark(final: Path) -> Path:
    return final.parent / f".{final.name}.publishing.json"


def _real(final: Path) -> Path:
    """``final`` absolute, its last part not a symlink (a linked folder is replaced where it
    lies)."""
    final = Path(os.path.abspath(final))
    return final.resolve() if final.is_symlink() else final


def _is_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _discard(path: Path) -> None:
    """Delete a file, a symlink (never its target) or a folder tree, if there."""
    if _is_dir(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _put(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, deleting what ``dst`` held (a folder: renamed aside first)."""
    if _is_dir(src) or _is_dir(dst):
        old = dst.parent / f".{dst.name.lstrip('.')}.old-{secrets.token_hex(4)}"
        if os.path.lexists(dst):
            os.rename(dst, old)  # a crash here: the marked publication moves src in next time
        os.rename(src, dst)
        with _ignored():
            _discard(old)
    else:
        os.replace(src, dst)
    _fsync_dir(dst.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False when unsupported."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):  # pragma: no cover
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # pragma: no cover - glibc < 2.28
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # pragma: no cover - fs lacks it
        return False
    raise OSError(err, os.strerror(err), str(b))


def _recover(final: Path, stage: Path, files) -> None:
    """Finish a publication that was marked (its result is complete) and perhaps interrupted:
    move the rest in (roll forward) and delete what it replaced; no mark: nothing to do."""
    if files is None:
        mark = _folder_mark(final)
        if not mark.is_file():
            return
        new = read_json(mark)
        ident = os.lstat(stage) if _is_dir(stage) else None
        if ident is not None and (ident.st_dev, ident.st_ino) == (new.get("dev"), new.get("ino")):
            if not (_is_dir(final) and _exchange(stage, final)):  # atomic where Linux can
                _put(stage, final)
        shutil.rmtree(stage, ignore_errors=True)  # after the exchange: the replaced result
        for old in final.parent.glob(f".{final.name.lstrip('.')}.old-*"):  # after two renames
            with _ignored():
                _discard(old)
        _fsync_dir(final.parent)
        with _ignored():
            os.unlink(mark)
        return
    if not (stage / _MARK).is_file():
        return
    present = set(read_json(stage / _MARK).get("present", ()))
    for entry in files:  # the caller's names only: the mark never names a path
        src, dst = stage / entry, final / entry
        if entry in present and os.path.lexists(src):
            dst.parent.mkdir(parents=True, exist_ok=True)
            _put(src, dst)
        elif entry not in present and os.path.lexists(dst):
            _discard(dst)
        for old in dst.parent.glob(f".{dst.name.lstrip('.')}.old-*"):  # renamed aside by _put
            with _ignored():
                _discard(old)
    shutil.rmtree(stage)
    _fsync_dir(final)


def _copy(src: Path, dst: Path) -> None:
    """Copy regular file or folder ``src`` to ``dst`` (fsynced), if there; symlinks and special
    files are skipped, never followed; a folder's locks, temporary and staging files too."""
    info = os.lstat(src) if os.path.lexists(src) else None
    if info is None or not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    if stat.S_ISREG(info.st_mode):
        _copy_file(src, dst)
        return
    dst.mkdir(exist_ok=True)
    for entry in os.scandir(src):
        if not (entry.name.endswith((".lock", STAGING, _MARK)) or entry.name.startswith(".tmp-")):
            _copy(Path(entry.path), dst / entry.name)
    _fsync_dir(dst)


def _copy_file(src, dst: Path) -> None:
    flags = os.O_NOFOLLOW | os.O_NONBLOCK
    with open(os.open(src, os.O_RDONLY | flags), "rb") as fin, \
            open(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | flags, 0o666), "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())


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
    """Raise when ``--resume`` meets a run in ``path`` made with a different config (or with
    a saved config that is not a mapping: a damaged or foreign file)."""
    if not isinstance(old, dict):
        raise VarstudyError(f"--resume found no config in {path} (it holds a "
                            f"{type(old).__name__} where the run's options belong: a damaged or "
                            "foreign file); valid choices: delete it, or no --resume (start "
                            "over), or another --out")
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
