"""Crash safety of output folders: recovering what a killed run left behind, and clear disk-full errors.

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
from pathlib import Path

from slmopt.errors import UserError

__all__ = ["DISK_FULL_ERRNOS", "disk_full_error", "pid_alive", "recover_stale"]

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
