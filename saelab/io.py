"""Safe outputs: every file and results folder saelab produces appears whole or not at all, and saelab deletes
nothing it did not write.

Files are written to a temporary name in the same directory and renamed over the target; result folders are
assembled in a temporary sibling directory and swapped in at the end (`output_folder`), so an interrupted or
failed run never leaves a half-written file or an empty folder behind. Temporary names carry the writer's process
id (`.NAME.PID.xxxxxxxx.tmp`), so a later run can tell a killed run's leftovers from a live run's and remove them.

Before anything is written, `output_folder` checks the destination: a non-empty `--out` that is not a complete
output of the same kind (an `OutputKind`) is refused unless `--overwrite`; an `--out` that is, contains or sits
inside an input of the run, or that is or contains the working or home directory, is refused always; and only one
run at a time writes to an `--out` (a lock file naming the writer's process id, taken over from dead processes).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from saelab.errors import DivergedError, SaelabError


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temp_prefix(target: Path) -> str:
    """`.NAME.PID.`: the hidden prefix of a temporary sibling of `target` written by this process."""
    return f".{target.name}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove the hidden temporary siblings of `target` (`.NAME.PID.xxxxxxxx.tmp/.old`) left by killed processes.

    Only names of exactly saelab's pattern whose process is gone are touched; returns what was removed.
    """
    target = Path(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\d+)\.[a-z0-9_]{{8}}\.(tmp|old)")
    removed = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in target.parent.iterdir():
            match = pattern.fullmatch(entry.name)
            if match is None or _pid_alive(int(match.group(1))):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: str | Path, directory: bool = False) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give results the modes a plain open() would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        _publish_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_text(data: Any, indent: int | None = 2) -> str:
    """Valid JSON for `data`: NaN and ±inf, which JSON cannot hold, become null ("undefined")."""
    return json.dumps(finite_or_null(data), indent=indent, allow_nan=False)


def finite_or_null(data: Any) -> Any:
    """`data` with every non-finite float replaced by None, recursively through dicts, lists and tuples."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: finite_or_null(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_or_null(value) for value in data]
    return data


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json_text(data) + "\n")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (contiguous CPU copies, so views and GPU tensors are fine)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        _publish_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing or corrupt file, or weights with NaN or inf, is a one-line SaelabError."""
    path = Path(path)
    if not path.is_file():
        raise SaelabError(f"{path} not found")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise SaelabError(f"{path} is not a readable safetensors file ({err}); it is corrupt or truncated") from None
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise SaelabError(f"{path}: tensor '{name}' holds NaN or inf; the run that wrote it diverged, retrain it")
    return tensors


# --- results folders -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputKind:
    """What one command writes: a name for messages, the entries it writes, and how to recognise a complete one.

    `names` are the glob patterns of the top-level entries the command writes; `marker(path)` says whether a folder
    is a complete output of this kind (usually: its cfg/manifest names the format). A folder is "ours" to replace
    when it is empty, or when the marker holds and every entry in it matches `names`, or (`nested`) is itself a
    folder of this kind (the SAE folders of a sweep). Outputs that are costly to remake set `replace_quietly=False`.
    """

    name: str
    names: tuple[str, ...]
    marker: Callable[[Path], bool]
    nested: bool = False
    replace_quietly: bool = True  # False: even a complete output of this kind is replaced only with --overwrite

    def owns(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.names)

    def recognises(self, folder: Path) -> bool:
        """`folder` is empty, or a complete output of this kind holding nothing saelab did not write."""
        try:
            entries = list(Path(folder).iterdir())
        except OSError:
            return False
        if not entries:
            return True
        complete = self.marker(folder)
        if not complete and not self.nested:
            return False
        for entry in entries:
            if self.owns(entry.name):
                continue
            if self.nested and entry.is_dir() and not entry.is_symlink() and self.recognises(entry):
                complete = complete or any(entry.iterdir())
                continue
            return False
        return complete


def json_format_marker(file: str, *formats: str, key: str = "format") -> Callable[[Path], bool]:
    """A marker: `folder/file` is a JSON object whose `key` is one of `formats`."""

    def marker(folder: Path) -> bool:
        try:
            data = json.loads((Path(folder) / file).read_text())
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and data.get(key) in formats

    return marker


def _protected(out: Path, inputs: Iterable[str | Path], flag: str) -> None:
    """Refuse an `out` that is, contains or sits inside an input, or is or contains the working or home directory."""
    for given in inputs:
        path = Path(given).expanduser().resolve()
        if out == path or path in out.parents or out in path.parents:
            how = "is" if out == path else ("sits inside" if path in out.parents else "contains")
            raise SaelabError(f"{flag} {out} {how} {path}, an input of this run; choose a folder elsewhere")
    for name, path in (("the working directory", Path.cwd().resolve()), ("your home directory", Path.home().resolve())):
        if out == path or out in path.parents:
            how = "is" if out == path else "contains"
            raise SaelabError(f"{flag} {out} {how} {name}; saelab would replace it whole. Choose a new folder")


def check_output(
    out: str | Path, kind: OutputKind, inputs: Iterable[str | Path] = (), overwrite: bool = False, flag: str = "--out"
) -> Path:
    """Check that the run may write `out` (see the module docstring); return its absolute path. Writes nothing."""
    out = Path(out).expanduser()
    if str(out) in ("", "."):
        out = Path.cwd()
    out = out.resolve()
    _protected(out, inputs, flag)
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            where = "is" if parent == out else "sits under"
            raise SaelabError(f"{flag} {out} {where} a file ({parent}); choose a folder path")
    if out.is_dir() and not overwrite and not kind.recognises(out):
        names = sorted(e.name for e in out.iterdir())
        foreign = [name for name in names if not kind.owns(name)] or names
        raise SaelabError(
            f"{flag} {out} is not empty and is not a {kind.name} (it holds {', '.join(foreign[:3])});"
            " choose a new folder, or pass --overwrite to replace it whole"
        )
    if out.is_dir() and not overwrite and not kind.replace_quietly and any(out.iterdir()):
        raise SaelabError(f"{flag} {out} already exists ({kind.name}); pass --overwrite to replace it")
    return out


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the lock `.NAME.lock` beside `out` for the duration: one run per --out at a time.

    The lock file names its holder's process id; the kernel drops the lock when that process dies, so the lock of
    a killed run is taken over by the next one.
    """
    out = Path(out)
    _make_parents(out)
    path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SaelabError(
                f"another saelab run (process {holder}) is writing {out}; wait for it to finish or choose another --out"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file between our open and our lock: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _make_parents(out: Path) -> list[Path]:
    """Create `out`'s missing parents; return the ones created (outermost first), to remove again on failure."""
    missing = [p for p in reversed(Path(out).parents) if not p.exists()]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def output_folder(
    out: str | Path,
    kind: OutputKind,
    inputs: Iterable[str | Path] = (),
    overwrite: bool = False,
    refresh: bool = False,
    flag: str = "--out",
) -> Iterator[Path]:
    """Yield an empty temporary folder whose contents become `out` when the block finishes without an exception.

    Checks `out` first (`check_output`), holds its lock, and removes a killed run's temporaries. By default the
    finished folder replaces `out` whole, in one rename, so the previous output stays intact until then.
    `refresh=True` (rebuilding an output in place) instead moves each written entry into `out`, replacing only
    those names and keeping anything else in the folder. On failure the temporary folder and any parent folders
    this call created are removed.
    """
    out = check_output(out, kind, inputs, overwrite or refresh, flag)  # a refresh keeps files that are not ours
    created = _make_parents(out)
    try:
        with output_lock(out):
            remove_stale_temporaries(out)
            tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), suffix=".tmp", dir=out.parent))
            _publish_mode(tmp, directory=True)
            try:
                yield tmp
                if refresh and out.is_dir():
                    _merge_into(tmp, out)
                else:
                    _swap_in(tmp, out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        _remove_empty(created)
        raise


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace `out` by `tmp` with renames only: the old folder is moved aside, then deleted."""
    old = None
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), suffix=".old", dir=out.parent))
        os.rmdir(old)
        os.rename(out, old)
    os.rename(tmp, out)
    _fsync_dir(out.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _merge_into(tmp: Path, out: Path) -> None:
    """Move every entry of `tmp` into `out`, replacing entries of the same name; other entries of `out` stay."""
    for entry in sorted(tmp.iterdir()):
        target = out / entry.name
        if entry.is_dir() and target.is_dir():
            _swap_in(entry, target)
        else:
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
    _fsync_dir(out)


def check_output_file(
    out: str | Path, is_ours: Callable[[Path], bool], inputs: Iterable[str | Path] = (), overwrite: bool = False,
    flag: str = "--out", what: str = "file",
) -> Path:  # fmt: skip
    """The single-file version of `check_output`: an existing file is replaced only if it is one saelab wrote of
    this kind (`is_ours`) or with --overwrite; a folder is never replaced."""
    out = Path(out).expanduser().resolve()
    _protected(out, inputs, flag)
    if out.is_dir():
        raise SaelabError(
            f"{flag} {out} is a folder; give the path of the {what} to write, e.g. {out / 'latents.html'}"
        )
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise SaelabError(f"{flag} {out} sits under a file ({parent}); choose another path")
    if out.exists() and not overwrite and not is_ours(out):
        raise SaelabError(f"{flag} {out} exists and is not a saelab {what}; choose another path or pass --overwrite")
    return out


def describe_os_error(err: OSError) -> str:
    """One line for an operating-system failure: what failed, where, and what to do."""
    where = f" {err.filename}" if getattr(err, "filename", None) else ""
    if getattr(err, "filename2", None):
        where += f" -> {err.filename2}"
    hints = {
        errno.ENOSPC: "the disk is full; free some space or write elsewhere",
        errno.EDQUOT: "the disk quota is exhausted; free some space or write elsewhere",
        errno.EACCES: "permission denied; choose a folder you can write to",
        errno.EPERM: "operation not permitted; choose a folder you can write to",
        errno.EROFS: "the file system is read-only; write elsewhere",
        errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
        errno.EEXIST: "something already exists there; choose another path",
        errno.EBUSY: "the file or folder is busy (in use by another process); close it or choose another path",
        errno.ENOTEMPTY: "the folder is not empty; choose another path",
        errno.EADDRINUSE: "the address is in use; pick another --port (0 picks a free one)",
        errno.EADDRNOTAVAIL: "the address is not available on this machine",
        errno.EISDIR: "that is a folder, not a file; give a file path",
        errno.ENAMETOOLONG: "the path is too long; choose a shorter one",
        errno.EMFILE: "too many open files; raise the limit (ulimit -n) or close other programs",
        errno.EFBIG: "the file is larger than this system allows (see ulimit -f); write less or elsewhere",
        errno.ENOENT: "no such file or folder",
        errno.ENOMEM: "out of memory; use smaller sizes",
    }
    reason = hints.get(err.errno or -1, err.strerror or type(err).__name__)
    return f"cannot complete the operation on{where}: {reason} ({err.strerror or err})".replace(" on:", ":")


def existing_paths(*candidates: str | Path | None) -> tuple[Path, ...]:
    """The candidates that name something on disk (a model or dataset *name* does not), resolved: a run's inputs."""
    return tuple(Path(c).expanduser().resolve() for c in candidates if c and Path(c).expanduser().exists())


def file_starts_with(path: Path, marker: bytes, within: int = 4096) -> bool:
    """Whether `marker` occurs in the first `within` bytes of `path` (how a saelab-written file is recognised)."""
    try:
        with open(path, "rb") as handle:
            return marker in handle.read(within)
    except OSError:
        return False


def partial_folder(out: Path) -> Path:
    """Where a resumable run works until it is complete: the hidden sibling `.NAME.partial` of its --out."""
    return Path(out).parent / f".{Path(out).name}.partial"


@contextlib.contextmanager
def resumable_output(
    out: str | Path,
    kind: OutputKind,
    resume: bool,
    resume_file: str,
    inputs: Iterable[str | Path] = (),
    overwrite: bool = False,
    writer: bool = True,
) -> Iterator[Path]:
    """`output_folder` for a run that checkpoints: yield its work folder `.NAME.partial` beside `out`.

    The run writes its log and checkpoints (`resume_file`) there; when the block finishes, `resume_file` is dropped
    and the work folder replaces `out` in one rename, so a previous output in `out` stays whole until then. A run
    that fails before writing `resume_file`, or diverges (DivergedError), leaves nothing; one killed or stopped
    later leaves its work folder for `resume`.
    `writer=False` (the other processes of a torchrun group) checks the same things but writes nothing.
    """
    out = Path(out).expanduser().resolve()
    partial = partial_folder(out)
    if resume:
        _protected(out, inputs, "--out")
        if not (partial / resume_file).is_file():
            raise SaelabError(f"no checkpoint for {out} to resume from; run without --resume to start afresh")
    else:
        out = check_output(out, kind, inputs, overwrite)
        if (partial / resume_file).exists() and not overwrite:
            raise SaelabError(
                f"{out} has an unfinished run ({partial.name}); pass --resume to continue it,"
                " or --overwrite to start afresh"
            )
    if not writer:
        yield partial
        return
    created = _make_parents(out)
    try:
        with output_lock(out):
            remove_stale_temporaries(out)
            if not resume:
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir()
                _publish_mode(partial, directory=True)
            try:
                yield partial
            except BaseException as err:
                if isinstance(err, DivergedError) or not (partial / resume_file).exists():  # nothing to resume
                    shutil.rmtree(partial, ignore_errors=True)
                raise
            (partial / resume_file).unlink(missing_ok=True)
            _swap_in(partial, out)
    except BaseException:
        _remove_empty(created)
        raise
