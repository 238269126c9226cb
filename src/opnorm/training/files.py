"""Files of a run: atomic writes, sha256 sidecars, the run directory's lock, stale temp files.

* :func:`atomic_write` / :func:`write_text_atomic`: a same-directory temp file, fsync, rename;
  the result has the mode a plain ``open`` gives (the user's umask), never half-written.
* :func:`save_with_digest` writes a file and its ``<file>.sha256`` sidecar (``sha256sum``
  format, so ``sha256sum -c`` checks it); :func:`verify_digest` refuses a file that does not
  match; :func:`write_digest` vouches for a file obtained elsewhere.
* :class:`RunLock`: an exclusive ``fcntl.flock`` on ``<run dir>/.lock`` held by the one
  process that writes the run; the kernel releases it when the process exits or dies.
* :func:`remove_stale_temp_files`: the ``.<name>.*.tmp`` files a killed writer left behind.
* Nothing is written through a link: a symbolic link where a file is written (or a lock file
  with other hard links) raises :class:`UnsafePathError`, so a run directory copied from an
  archive or a shared place cannot make opnorm overwrite a file elsewhere.

Example:
    >>> import os, tempfile
    >>> from opnorm.training.files import RunLock, remove_stale_temp_files, save_with_digest, verify_digest
    >>> with tempfile.TemporaryDirectory() as run:
    ...     save_with_digest(os.path.join(run, "w.bin"), lambda f: f.write(b"abc"))
    ...     verify_digest(os.path.join(run, "w.bin"))  # raises CheckpointError when the bytes changed
    ...     with RunLock(run):
    ...         remove_stale_temp_files(run, ("w.bin",))  # the temp files a killed writer left
    []
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = [
    "CheckpointError",
    "RunLockedError",
    "UnsafePathError",
    "refuse_link",
    "one_line",
    "fold_lines",
    "read_json",
    "read_json_object",
    "DIGEST_SUFFIX",
    "atomic_write",
    "write_text_atomic",
    "save_with_digest",
    "sidecar",
    "write_digest",
    "verify_digest",
    "RunLock",
    "LOCK_NAME",
    "remove_stale_temp_files",
]


class CheckpointError(ValueError):
    """A checkpoint or weights file is missing, corrupt, unsafe, or does not fit the model."""


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # not on Windows, which has no symlinks by default


class UnsafePathError(ValueError):
    """A file opnorm would write is a symbolic link (or a hard-linked lock file): writing would change another file."""


def refuse_link(path: str | os.PathLike) -> None:
    """Raise :class:`UnsafePathError` if ``path`` is a symbolic link (dangling or not).

    Example:
        >>> import os, tempfile
        >>> from opnorm.training.files import refuse_link
        >>> with tempfile.TemporaryDirectory() as run:
        ...     refuse_link(os.path.join(run, "config.json"))  # fine when absent or a plain file
        ...     os.symlink(os.path.join(run, "elsewhere.json"), os.path.join(run, "config.json"))
        ...     refuse_link(os.path.join(run, "config.json"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        opnorm.training.files.UnsafePathError: ...
    """
    path = Path(path)
    if path.is_symlink():
        raise UnsafePathError(
            f"{path} is a symbolic link (to {os.readlink(path)}); opnorm writes only plain files, never through a "
            f"link, so that a copied run directory cannot overwrite another file: remove the link (rm {path}) or "
            f"choose another directory"
        )


def fold_lines(text: Any) -> str:
    """``str(text)`` on one line: every run of white space (newlines too) becomes one space.

    Example:
        >>> from opnorm.training.files import fold_lines
        >>> fold_lines("bad value\\n  for --eps")
        'bad value for --eps'
    """
    return " ".join(str(text).split())


def one_line(err: BaseException, limit: int = 160) -> str:
    """``"<ErrorType>: <message>"`` on one line, cut at ``limit`` characters, for error messages."""
    text = fold_lines(err)
    return f"{type(err).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def read_json(path: str | os.PathLike, what: str) -> Any:
    """The JSON value in the file ``path``, or a one-line error naming ``what`` and the path.

    Raises FileNotFoundError when the file is missing or unreadable, ValueError when it is not
    UTF-8 JSON.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from opnorm.training.files import read_json
        >>> path = Path(tempfile.mkdtemp()) / "results.json"
        >>> _ = path.write_text('{"seeds": [0, 1, 2]}')
        >>> read_json(path, "results file")["seeds"]
        [0, 1, 2]
        >>> read_json(path.with_name("missing.json"), "results file")
        Traceback (most recent call last):
        FileNotFoundError: results file ... not found
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} not found") from None
    except OSError as err:
        raise FileNotFoundError(f"cannot read {what} {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path} is not valid JSON ({err.msg} at line {err.lineno})") from None
    return data


def read_json_object(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """:func:`read_json` for a file that must hold a JSON object (a ValueError otherwise).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from opnorm.training.files import read_json_object
        >>> path = Path(tempfile.mkdtemp()) / "config.json"
        >>> _ = path.write_text("[1, 2]")
        >>> read_json_object(path, "config file")
        Traceback (most recent call last):
        ValueError: config file ... must hold a JSON object, not a list
    """
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must hold a JSON object, not a {type(data).__name__}")
    return data


# --------------------------------------------------------------------------- atomic writes


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through a same-directory temp file + fsync + os.replace (never through a link)."""
    path = Path(path)
    refuse_link(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_for(path)
    try:
        with tmp:
            write(tmp)
        _replace(tmp.name, path)
    except BaseException:
        _discard(tmp.name)
        raise


def _temp_for(path: Path):
    # the ".<name>.*.tmp" pattern is what remove_stale_temp_files() recognizes after a crash;
    # mkstemp opens with O_CREAT | O_EXCL, which never follows a link planted under its name
    return tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)


def _replace(tmp: str, path: Path) -> None:
    """fsync the closed temp file, give it a plain open()'s mode (mkstemp makes 0600), rename it."""
    fd = os.open(tmp, os.O_RDONLY | _NOFOLLOW)
    try:
        os.fsync(fd)
        os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _discard(tmp: str) -> None:
    # whatever went wrong (including KeyboardInterrupt), leave no temp file behind
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename; the umask's mode).

    Example:
        >>> import os, tempfile
        >>> from opnorm.training.files import atomic_write
        >>> with tempfile.TemporaryDirectory() as run:
        ...     atomic_write(os.path.join(run, "notes.bin"), b"abc")
        ...     open(os.path.join(run, "notes.bin"), "rb").read()
        b'abc'
    """
    _atomic_write(path, lambda f: f.write(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write text atomically (see :func:`atomic_write`): never half-written, synced to disk."""
    atomic_write(path, text.encode("utf-8"))


# --------------------------------------------------------------------------- integrity

DIGEST_SUFFIX = ".sha256"


class _Hashing:
    """A write-only file wrapper that hashes what passes through (no second read of the file)."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def __getattr__(self, name: str):  # name, tell, ...: those of the file
        return getattr(self.f, name)


def _digest_of(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + DIGEST_SUFFIX)


def _digest_lines(digests: list[str], name: str) -> bytes:
    return "".join(f"{d}  {name}\n" for d in digests).encode()


def _read_digests(path: Path) -> list[str]:
    side = sidecar(path)
    try:
        lines = side.read_text().splitlines()
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} has no checksum file {side.name}, so its integrity cannot be checked; if you trust the file, "
            f"create one: cd {path.parent} && sha256sum {path.name} > {side.name}"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checksum file {side} is unreadable ({one_line(err)})") from None
    digests = [line.split()[0].lower() for line in lines if line.strip()]
    if not digests or not all(len(d) == 64 and all(c in "0123456789abcdef" for c in d) for d in digests):
        raise CheckpointError(f"checksum file {side} is damaged (expected lines '<sha256>  {path.name}')")
    return digests


def save_with_digest(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Atomically write ``path`` and its sidecar so that, whenever the process dies, the file
    on disk matches one of the sidecar's digests: the sidecar first lists the new and the old
    digest, then the file is replaced, then the sidecar lists the new digest alone."""
    path = Path(path)
    refuse_link(path)
    refuse_link(sidecar(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_for(path)
    try:
        with tmp:
            hashing = _Hashing(tmp)
            write(hashing)
        new = hashing.sha.hexdigest()
        old = _listed_digests(path) if path.is_file() else []
        atomic_write(sidecar(path), _digest_lines([new, *old], path.name))
        _replace(tmp.name, path)
    except BaseException:
        _discard(tmp.name)
        raise
    if old:
        atomic_write(sidecar(path), _digest_lines([new], path.name))


def _listed_digests(path: Path) -> list[str]:
    # the digests the current sidecar vouches for (reading it is cheaper than hashing the file)
    try:
        return _read_digests(path)[:1]
    except CheckpointError:
        return []


def write_digest(path: str | os.PathLike) -> str:
    """Write ``<path>.sha256`` for an existing file (e.g. a checkpoint copied without its
    sidecar, after checking it by other means); returns the hex digest.

    Example:
        >>> import os, tempfile
        >>> from opnorm.training.files import write_digest
        >>> with tempfile.TemporaryDirectory() as run:
        ...     open(os.path.join(run, "checkpoint.pt"), "wb").close()  # an empty file
        ...     write_digest(os.path.join(run, "checkpoint.pt"))  # doctest: +ELLIPSIS
        'e3b0c442...'
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no file at {path}")
    digest = _digest_of(path)
    atomic_write(sidecar(path), _digest_lines([digest], path.name))
    return digest


def verify_digest(path: str | os.PathLike, what: str = "file") -> None:
    """Check ``path`` against its ``<path>.sha256`` sidecar.

    Raises:
        CheckpointError: the sidecar is missing or damaged, or the bytes do not match it
            (one line naming the file).
    """
    path = Path(path)
    expected = _read_digests(path)
    if _digest_of(path) not in expected:
        raise CheckpointError(
            f"{what} {path} is corrupt or truncated: its sha256 does not match {sidecar(path).name}; "
            f"restore it from a copy or start a new run"
        )


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    # Make the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- one writer


LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """An exclusive OS lock (``fcntl.flock``) on ``<run_dir>/.lock``, with the holder's PID inside.

    The kernel drops the lock when its file is closed, including when the process is
    killed, so a crashed run never leaves the directory locked. On platforms without
    ``fcntl`` the lock is a no-op.

    Raises (on enter):
        RunLockedError: another process holds it (the message names its PID).

    Example:
        >>> import tempfile
        >>> from opnorm.training.files import RunLock
        >>> with tempfile.TemporaryDirectory() as run:
        ...     with RunLock(run):
        ...         pass  # the only writer of run
    """

    def __init__(self, run_dir: str | os.PathLike, flag: str = "--out") -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.flag = flag  # the option that names the directory, for the messages
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        try:
            import fcntl  # POSIX only: imported here so that the module loads on Windows
        except ImportError:  # pragma: no cover - not POSIX
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        refuse_link(self.path)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | os.O_NONBLOCK, 0o666)
        except OSError as err:  # ELOOP: a link planted after the check above
            raise UnsafePathError(
                f"cannot open lock file {self.path} ({err.strerror}); remove it (rm {self.path}) and rerun"
            ) from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:  # a FIFO, or a hard link to another file
            os.close(fd)
            raise UnsafePathError(
                f"lock file {self.path} is not a plain file of its own (it has {info.st_nlink} "
                f"links or is a special file); remove it (rm {self.path}) and rerun"
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(
                f"run directory {self.path.parent} is in use by process {holder} (another opnorm process); "
                f"wait for it to finish, stop it, or choose another {self.flag}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd = None


def remove_stale_temp_files(run_dir: str | os.PathLike, names: tuple[str, ...]) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files of ``names`` (and their sidecars) in ``run_dir``,
    which a writer killed mid-save leaves behind; call it holding the :class:`RunLock`.
    A link is removed itself (never its target); a directory of such a name is no temp
    file of opnorm's and stays. Returns the removed paths."""
    run_dir = Path(run_dir)
    removed = []
    for name in names:
        for stem in (name, name + DIGEST_SUFFIX):
            for tmp in run_dir.glob(f".{stem}.*.tmp"):
                if tmp.is_dir() and not tmp.is_symlink():
                    continue
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed
