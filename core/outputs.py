"""Every file llmkit writes goes through `atomic_output`, so no run can lose data.

A writer that opens its destination directly can destroy it: a crash, a full disk or Ctrl-C leaves a
half-written file where a good one was, and `-o` pointing at one of the command's own inputs
overwrites the input it is still reading. So each output is written to a hidden temp file beside
the destination and renamed over it only when complete, after these checks:

* the destination is not one of the inputs (after resolving symlinks, `..` and relative paths), nor
  an existing file inside an input directory (an HF checkpoint folder); a new file there is fine;
* it is not a directory or a device, and its directory exists and is writable: a one-line `LlmkitError` before
  any work, never an internal exception's text; OS errors while writing become one line too;
* the finished file gets the mode a normal file gets under the umask (mkstemp's 0600 does not);
* SIGTERM and SIGHUP clean up like Ctrl-C while an output is open;
* temp files left by a SIGKILLed run (which cannot clean up) are removed by the next write to the
  same destination, once their owning process is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from llmkit.errors import LlmkitError

_TAG = ".llmkit-tmp-"
_NAME_KEEP = 200  # of the destination's name in the temp name: stays under NAME_MAX (255)
_OWNER = re.compile(r"(\d+)-[0-9a-f]+")  # what follows the prefix: pid-random

_lock = threading.Lock()
_open: set[str] = set()  # temp files this process is writing now (any thread)
_main_opens = 0  # outputs open in the main thread: the signal handlers live while > 0
_saved: dict[int, object] = {}  # signal -> handler replaced while outputs are open


class OutputError(LlmkitError, OSError):
    """An OS error while writing an output: one line for the CLI, still an OSError for callers."""

    def __str__(self) -> str:  # the message, not OSError's "[Errno N] ...: 'path'"
        return self.args[0]


def _prefix(dest: Path) -> str:
    return f".{dest.name[:_NAME_KEEP]}{_TAG}"


def _real(path: Path) -> Path:
    """Absolute, symlinks and `..` resolved (the path need not exist)."""
    return Path(os.path.realpath(path))


def check_output(dest: str | os.PathLike, inputs: Iterable = ()) -> Path:
    """Raise LlmkitError if writing `dest` could destroy an input or cannot work; return the real
    path to write. Cheap: callers run it before long work so a bad -o fails at once."""
    dest = Path(dest).expanduser()
    real = _real(dest)
    if real.is_dir():
        raise LlmkitError(f"cannot write {dest}: it is a directory (give a file path)")
    if real.exists() and not real.is_file():  # /dev/null, a FIFO: a rename would replace them
        raise LlmkitError(f"cannot write {dest}: not a regular file")
    for inp in inputs:
        if inp is None:
            continue
        inp = Path(inp).expanduser()
        rin = _real(inp)
        if real == rin or (real.exists() and rin.exists() and os.path.samefile(real, rin)):
            raise LlmkitError(f"refusing to write {dest}: it is the input {inp}")
        if rin.is_dir() and real.exists() and real.is_relative_to(rin):
            raise LlmkitError(
                f"refusing to write {dest}: it would replace a file of the input directory {inp}"
            )
    parent = real.parent
    if not parent.exists():
        raise LlmkitError(f"cannot write {dest}: directory {parent} does not exist")
    if not parent.is_dir():
        raise LlmkitError(f"cannot write {dest}: {parent} is not a directory")
    # a temp file is created and renamed in the directory: that needs write and search permission
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LlmkitError(f"cannot write {dest}: directory {parent} is not writable")
    return real


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_leftovers(real: Path) -> list[Path]:
    """Delete temp files of `real` whose writer is gone (SIGKILL, power loss); returns them.

    A temp file named with this process's own pid that this process is not writing is stale too:
    in a container the rerun often gets the dead run's pid (pid 1)."""
    prefix, removed = _prefix(real), []
    try:
        names = [n for n in os.listdir(real.parent) if n.startswith(prefix)]
    except OSError:
        return removed
    for name in names:
        m = _OWNER.fullmatch(name[len(prefix) :])
        if m is None:
            continue
        pid, path = int(m.group(1)), real.parent / name
        with _lock:
            mine = str(path) in _open
        if mine or (pid != os.getpid() and _alive(pid)):
            continue
        with contextlib.suppress(FileNotFoundError):  # another run cleaned it first
            path.unlink()
            removed.append(path)
    return removed


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _catch_signals() -> None:
    """SIGTERM/SIGHUP kill without unwinding: make them an interrupt so `finally` blocks run.
    Only handlers still at the default are replaced: SIG_IGN (nohup) and an application's own
    handler stay. Signals can only be set from the main thread."""
    global _main_opens
    if threading.current_thread() is not threading.main_thread():
        return
    with _lock:
        _main_opens += 1
        if _main_opens > 1:
            return
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) is signal.SIG_DFL:
                _saved[sig] = signal.signal(sig, _interrupt)


def _release_signals() -> None:
    global _main_opens
    if threading.current_thread() is not threading.main_thread():
        return
    with _lock:
        _main_opens -= 1
        if _main_opens > 0:
            return
        while _saved:
            sig, old = _saved.popitem()
            signal.signal(sig, old)


def _write_error(dest: Path, e: OSError) -> OutputError:
    err = OutputError(f"cannot write {dest}: {e.strerror or e}")
    err.errno, err.strerror, err.filename = e.errno, e.strerror, str(dest)
    return err


def _fsync_dir(d: Path) -> None:
    """Make the rename itself durable; some filesystems cannot open or fsync a directory."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(dest: str | os.PathLike, inputs: Iterable = ()) -> Iterator[Path]:
    """Yield a temp path beside `dest` to write; on success it is renamed onto `dest` (a symlink
    `dest` is followed: its target is replaced), on any exception (Ctrl-C, SIGTERM, SIGHUP
    included) it is removed. `inputs`: files or directories the output must never replace."""
    dest = Path(dest).expanduser()
    real = check_output(dest, inputs)
    remove_leftovers(real)
    tmp = real.parent / f"{_prefix(real)}{os.getpid()}-{secrets.token_hex(4)}"
    _catch_signals()
    with _lock:
        _open.add(str(tmp))
    try:
        try:
            # O_EXCL: never reuse someone's file; 0o666 minus the umask, like any new file
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            mode = os.stat(tmp).st_mode & 0o7777
        except OSError as e:
            raise _write_error(dest, e) from None
        try:
            yield tmp
            with contextlib.suppress(OSError):  # e.g. vfat: the creation mode stays
                os.chmod(tmp, mode)  # a writer that recreated the file may have changed it
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)  # the data is on disk before the name points at it
            finally:
                os.close(fd)
            os.replace(tmp, real)
        except OSError as e:
            # errors naming another file (an input that cannot be read) are not write errors
            ours = (str(tmp), str(real), str(dest))
            if e.filename is not None and str(e.filename) not in ours:
                raise
            raise _write_error(dest, e) from e
        _fsync_dir(real.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        with _lock:
            _open.discard(str(tmp))
        _release_signals()
