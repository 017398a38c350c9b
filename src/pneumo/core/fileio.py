"""Files written so that a crash never leaves half of one, file hashes, and locks between processes."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import sys
import tempfile
from pathlib import Path

from pneumo.core.errors import OutputLocked, PneumoError


def atomic_write(path: str | Path, write) -> None:
    """Call `write(file)` on a temp file beside `path`, then rename it over `path`.

    A crash or kill at any point leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    if path.is_dir() or not path.name or path.name == "..":
        raise PneumoError(f"{path} is a folder: name the file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _new_file_mode())  # mkstemp makes 0600; others on the machine may need to read results
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def _new_file_mode() -> int:
    """What open() would give a new file under this process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def require_apart(outputs: dict[str, str | Path | None], inputs: dict[str, str | Path | None]) -> None:
    """Stop before any work when an output is one of the inputs or another output, under whatever name
    (a link, a hard link), or exists and is no regular file or folder (/dev/null, a FIFO): a command
    never writes over what it reads, nor two things into one file. Data outputs (all but `--log-file`)
    must not be this process's standard output either (/dev/stdout), where the summary goes. Keys
    name the option (`--out`), values are paths (None: not given)."""
    seen = {name: _identity(path) for name, path in inputs.items() if path is not None}
    stdout = _stdout_identity()
    for name, path in outputs.items():
        if path is None:
            continue
        key = _identity(path)
        if os.path.lexists(path) and not (Path(path).is_file() or Path(path).is_dir()):
            raise PneumoError(f"{name} {path} is not a regular file (a device, FIFO, socket or link loop): name a file")
        clash = next((other for other, k in seen.items() if k == key), None)
        if clash is None and name != "--log-file" and key == stdout:
            clash = "the standard output"
        if clash:
            raise PneumoError(f"{name} {path} is {clash} too: name another file, so that neither is overwritten")
        seen[name] = key


def _stdout_identity() -> tuple | None:
    try:
        st = os.fstat(sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real standard output (captured, closed)
        return None
    return (st.st_dev, st.st_ino)


def _identity(path: str | Path) -> tuple:
    """What a path is: its device and inode when it exists, else its resolved name."""
    try:
        st = os.stat(path)
    except OSError:  # not there (yet), or behind a link loop
        return (resolved_name(path),)
    return (st.st_dev, st.st_ino)


def resolved_name(path: str | Path) -> str:
    """`path` absolute with its links followed; behind a link loop, absolute as it is."""
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError):  # RuntimeError: a link loop, before Python 3.13
        return os.path.abspath(path)


MAX_TEXT_BYTES = 1 << 30  # a manifest or list larger than this is not what its name says


def read_regular(path: str | Path, what: str, limit: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of `path`, a regular file of at most `limit` bytes. A FIFO, a device (/dev/zero) or a
    folder could block or fill memory for ever: refused, like a missing file, in one sentence."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise PneumoError(f"{what} {path} cannot be read: {e.strerror or type(e).__name__}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise PneumoError(f"{what} {path} is not a regular file (a FIFO, device, socket or folder)")
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise PneumoError(f"{what} {path} is larger than {limit >> 20} MB")
    return data


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class FileLock:
    """An exclusive lock between processes, held on `lock_file` with flock.

    The kernel releases an flock when its holder dies, so a lock left by a killed run is simply taken
    over. The file stays behind, harmless, holding the last holder's pid for the message. Callers key
    it by the resolved path of what it guards, so a symlink to the same file meets the same lock. The
    lock file itself is never followed through a link and never cut short: a root cron job must not
    truncate whatever file someone planted at its name.
    """

    def __init__(self, lock_file: str | Path, busy: str):
        self.path = Path(lock_file)
        self.busy = busy  # the error message when another process holds it; {pid} is filled in

    def __enter__(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = _open_lock_file(self.path)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(self.fd, PID_WIDTH, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise OutputLocked(self.busy.format(pid=pid)) from None
        os.pwrite(self.fd, f"{os.getpid():>{PID_WIDTH - 1}}\n".encode(), 0)  # fixed width: nothing to cut
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


PID_WIDTH = 20  # a lock file holds one right-aligned pid and a newline, always this many bytes


def _open_lock_file(path: Path) -> int:
    """A descriptor of `path` as a lock file: created if missing; refused (exit 2) if it is a symbolic
    link, not a regular file, a second name of another file, or a file holding anything but a pid."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise PneumoError(f"{path} is a symbolic link, which a lock file never is: remove it") from None
        raise
    info = os.fstat(fd)
    content = os.pread(fd, 64, 0) if stat.S_ISREG(info.st_mode) else b""
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or not (content.strip().isdigit() or not content.strip()):
        os.close(fd)
        raise PneumoError(f"{path} is not a lock file of pneumo's (a link, a device or another file): remove it")
    return fd
