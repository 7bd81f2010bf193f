"""Writing safely: checks on the paths a run writes, made before any work starts, and the
atomic write every small output goes through.

A pruning run reads a model (and its external-data files) and a calibration file, and writes a
model and a report; ``make-calib`` reads texts and tokenizer files and writes an ``.npz``. A
mistyped argument must never make one of those writes replace a file the run reads, or replace
another output of the same run, and an output that cannot be written must be found before minutes
of scoring, not after. Paths are compared as files, not strings: ``./m.onnx``, ``d/../m.onnx``, a
symlink and a hard link all name the same file.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import IO

from optin_onnx.errors import OptinError

#: A path with what it is to the run ("output path", "calibration file"); ``None`` = not given.
Labelled = tuple[str, "str | os.PathLike | None"]


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file, through ``.``/``..``, symlinks and hard links."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def refuse_unsafe_writes(
    writes: Sequence[Labelled], reads: Sequence[Labelled], *, create_folders: bool = False
) -> None:
    """Raise :class:`OptinError` unless every given write path can be written safely.

    Each write must differ from every read and from every other write, must not be a directory,
    and its folder must exist and be writable; with ``create_folders`` (the writer creates missing
    folders) the nearest existing ancestor must be a writable folder instead.
    """
    given_reads = [(label, os.fspath(path)) for label, path in reads if path is not None]
    done: list[tuple[str, str]] = []
    for label, path in writes:
        if path is None:
            continue
        path = os.fspath(path)
        for other_label, other in [*given_reads, *done]:
            if same_file(path, other):
                raise OptinError(f"{label} is the {other_label}: refusing to overwrite it ({path})")
        _check_writable(label, path, create_folders)
        done.append((label, path))


def _check_writable(label: str, path: str, create_folders: bool) -> None:
    """The folder ``path`` goes into exists (or can be created) and accepts new files."""
    if os.path.isdir(path):
        raise OptinError(f"{label} {path} is a directory: give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if create_folders:
        while not os.path.lexists(folder):
            folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise OptinError(f"cannot write {label} {path}: {folder} is not an existing folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OptinError(f"cannot write {label} {path}: folder {folder} is not writable")


def write_atomically(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write(handle)`` into a temporary file beside it, then rename it.

    A crash, a full disk or a signal leaves the old file or the new one, never a truncated one,
    and no temporary file: it is removed on any exception, including the ``KeyboardInterrupt``
    and :class:`Terminated` that SIGINT, SIGTERM and SIGHUP raise. ``mkstemp`` creates the file
    private (0600); it gets the mode any new file of the user gets (``0666`` less the umask).
    """
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OptinError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise


def _umask() -> int:
    """The process umask (reading it means setting it, so it is put straight back)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


class Terminated(BaseException):
    """Raised by the CLI's SIGTERM and SIGHUP handlers, so they unwind (and clean up) like SIGINT.

    A ``BaseException``, like ``KeyboardInterrupt``, so that no ``except Exception`` on the way
    mistakes it for an error of the stage it interrupts.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
