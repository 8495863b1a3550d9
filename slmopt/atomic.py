"""Crash safety of output folders: atomic staging, recovering what a killed run left behind, disk-full errors.

``slmopt compile`` writes into a hidden sibling ``.<out>.tmp-<pid>`` and renames it into place; ``--force``
first renames the previous output to ``.<out>.old-<pid>``. SIGTERM unwinds through the cleanup, but SIGKILL
(or a power cut) cannot: it can leave a staging folder, and — killed between the two renames — the previous
output parked under ``.old-<pid>`` with no ``<out>``. :func:`recover_stale` runs before the next write into
the same output and puts things right: stale staging folders of dead processes are deleted, and a parked
previous output is moved back when ``<out>`` is missing (deleted when ``<out>`` exists: the swap finished).

Example:
    >>> from pathlib import Path
    >>> recover_stale(Path("/nonexistent/out"))
    []
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from slmopt.errors import UserError

__all__ = [
    "DISK_FULL_ERRNOS",
    "disk_full_error",
    "pid_alive",
    "recover_stale",
    "replace_output",
    "staging_folder",
]

log = logging.getLogger(__name__)

# errno -> how to say it; EFBIG is what RLIMIT_FSIZE (and some quota setups) produce.
DISK_FULL_ERRNOS: dict[int, str] = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this file system or process limit",
}


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists (a process of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(out: Path) -> list[tuple[str, int, Path]]:
    """``(kind, pid, path)`` of ``.<out>.tmp-<pid>`` / ``.<out>.old-<pid>`` siblings of ``out``."""
    if not out.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)$")
    found = []
    for entry in out.parent.iterdir():
        match = pattern.match(entry.name)
        if match:
            found.append((match.group(1), int(match.group(2)), entry))
    return sorted(found, key=lambda item: item[2].stat().st_mtime if item[2].exists() else 0.0)


def recover_stale(out: Path) -> list[str]:
    """Cleans up after killed runs that wrote to ``out``; returns what it did, one line per action.

    Folders of processes that are still running are left alone (another compile may be writing).
    """
    actions: list[str] = []
    for kind, pid, path in _leftovers(out):
        if pid == os.getpid() or pid_alive(pid):
            continue
        if kind == "old" and not out.exists():
            path.rename(out)  # killed between the two renames of a --force swap: restore the previous output
            actions.append(f"restored the previous output {out} from {path.name}")
        else:
            shutil.rmtree(path, ignore_errors=True)
            actions.append(f"removed {path.name} left by killed process {pid}")
    for action in actions:
        log.warning("%s", action)
    return actions


def disk_full_error(err: BaseException, where: Path) -> UserError | None:
    """A one-line :class:`UserError` if ``err`` (or an exception it chains) is a full-disk ``OSError``."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in DISK_FULL_ERRNOS:
            return UserError(
                f"cannot write the output under {where}: {DISK_FULL_ERRNOS[cur.errno]} "
                f"(errno {errno.errorcode.get(cur.errno, cur.errno)}); nothing was written, free space or "
                "choose another -o"
            )
        cur = cur.__cause__ or cur.__context__
    return None


@contextmanager
def staging_folder(out: Path | None) -> Iterator[Path | None]:
    """A temporary sibling of ``out`` that everything is written into; removed if anything fails.

    Renaming it into place at the end (:func:`replace_output`) is what makes an interrupted run leave no
    half-written output. ``out=None`` (nothing to write) yields None.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "out"
        >>> with staging_folder(out) as tmp:
        ...     _ = (tmp / "a.txt").write_text("x")
        ...     replace_output(tmp, out)
        >>> sorted(p.name for p in out.iterdir())
        ['a.txt']
    """
    if out is None:
        yield None
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        full = disk_full_error(err, out.parent)  # ENOSPC/EDQUOT/EFBIG anywhere in the chain: one clear line
        if full is not None:
            raise full from err
        raise


def replace_output(tmp: Path, out: Path) -> None:
    """Moves ``tmp`` to ``out``; an existing ``out`` (``--force``) is swapped out first, then deleted."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None and not out.exists():
            old.rename(out)  # e.g. SIGTERM between the renames: put the previous output back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
