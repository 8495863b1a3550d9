"""Fault injection: killed runs, a --force swap cut between its renames, and a full disk.

After every fault the output folder is either absent, byte-identical to the previous output, or complete
(report and manifest load, ``model.onnx`` equals an uninterrupted run's); a re-run after a SIGKILL cleans
the dead run's staging folder and produces the same ``model.onnx`` bytes; a full disk (a tiny tmpfs where
mounting is allowed, and ``RLIMIT_FSIZE`` everywhere) ends in one clear error with no staging folder left.

Kill points are seeded random delays after the staging folder appears (``SLMOPT_FUZZ=long`` tries more).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slmopt import artifacts
from slmopt.atomic import disk_full_error, recover_stale, replace_output
from slmopt.cli import main
from slmopt.lowering import MANIFEST
from tests.helpers import save_token_ids

PROFILE = os.environ.get("SLMOPT_FUZZ", "fast")
KILLS = {"fast": 2, "long": 12}[PROFILE]  # per phase (fresh output, --force over one)
ARGS = ["--passes", "mask-2to4{method=wanda}", "--seq-len", "16", "--num-samples", "4", "--threads", "1",
        "--no-bench", "--no-progress", "-q", "--backend-option", "generation=false"]  # fmt: skip


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _cmd(model: Path, calib: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "slmopt.cli", "compile", str(model), "--calib", str(calib), *ARGS, "-o",
            str(out), *extra]  # fmt: skip


def _assert_complete(out: Path, reference: dict[str, str]) -> None:
    json.loads((out / "report.json").read_text())
    json.loads((out / MANIFEST).read_text())
    assert _hashes(out)["model.onnx"] == reference["model.onnx"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, object]:
    from tests.models import save_hf

    root = tmp_path_factory.mktemp("faults")
    model = save_hf("llama", root / "model")
    calib = root / "calib.npy"
    save_token_ids(calib, (4, 16), vocab=128)
    ref = root / "reference"
    started = time.monotonic()
    done = subprocess.run(_cmd(model, calib, ref), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return {"root": root, "model": model, "calib": calib, "ref": ref, "hashes": _hashes(ref),
            "seconds": time.monotonic() - started}  # fmt: skip


def _kill_once(setup: dict, out: Path, sig: int, delay: float, previous: dict[str, str] | None) -> str:
    """Starts a compile into ``out``, kills it ``delay`` s after its staging folder appears, checks the
    output, and returns what it found: ``absent``, ``previous`` or ``complete``."""
    extra = ("--force",) if previous is not None else ()
    proc = subprocess.Popen(
        _cmd(setup["model"], setup["calib"], out, *extra), stderr=subprocess.PIPE, text=True
    )
    staging = out.parent / f".{out.name}.tmp-{proc.pid}"
    deadline = time.monotonic() + 300
    while not staging.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert "Traceback" not in err, err
    if sig == signal.SIGTERM:
        # -SIGTERM: it landed during interpreter teardown (handlers reset), after the output was complete.
        assert proc.returncode in (0, 128 + signal.SIGTERM, -signal.SIGTERM), err
        assert _leftovers(out) == [], "SIGTERM must clean up its staging folder"
    if out.exists() and (previous is None or _hashes(out) != previous):
        _assert_complete(out, setup["hashes"])  # the rename happened before the signal: all of it
        return "complete"
    return "previous" if out.exists() else "absent"


def _rerun(setup: dict, out: Path) -> dict[str, str]:
    """An uninterrupted in-process re-run: cleans up after killed runs, gives the reference bytes."""
    argv = ["compile", str(setup["model"]), "--calib", str(setup["calib"]), *ARGS, "-o", str(out), "--force"]
    assert main(argv) == 0
    _assert_complete(out, setup["hashes"])
    assert _leftovers(out) == []
    return _hashes(out)


def test_killed_compiles_leave_nothing_half_written_and_rerun_identically(setup, tmp_path):
    """Kills (alternating SIGKILL/SIGTERM, seeded random delays) into a fresh output, a re-run, then
    kills of ``--force`` runs over that output, then recovery."""
    rng = random.Random(1234)
    out = tmp_path / "out"
    budget = max(1.0, float(setup["seconds"]) * 0.5)
    outcomes = []
    for i in range(KILLS):
        sig = signal.SIGKILL if i % 2 == 0 else signal.SIGTERM
        outcomes.append(_kill_once(setup, out, sig, rng.uniform(0.0, budget), None))
        if out.exists():
            break
    previous = _rerun(setup, out)
    for i in range(KILLS):
        sig = signal.SIGKILL if i % 2 == 0 else signal.SIGTERM
        outcomes.append(_kill_once(setup, out, sig, rng.uniform(0.0, budget), previous))
        previous = _hashes(out)
    assert "absent" in outcomes or "previous" in outcomes, f"no kill landed mid-run: {outcomes}"
    recover_stale(out)  # what the next run does first: the SIGKILLed runs' staging folders go
    assert _leftovers(out) == [] and _hashes(out) == previous


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sigkill_between_force_renames_restores_the_previous_output(tmp_path, capsys):
    """The worst moment of a --force swap: previous output parked as .old-<pid>, new one still staged."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"previous")
    before = _hashes(out)
    pid = _dead_pid()
    out.rename(tmp_path / f".out.old-{pid}")
    staged = tmp_path / f".out.tmp-{pid}"
    staged.mkdir()
    (staged / "model.onnx").write_bytes(b"half")
    # The next run refuses to overwrite without --force — because the previous output is back.
    code = main(["compile", str(tmp_path / "missing-model"), "-o", str(out)])
    assert code == 2 and "exists; pass --force" in capsys.readouterr().err
    assert _hashes(out) == before
    assert _leftovers(out) == []


def test_stale_folders_of_live_processes_are_left_alone(tmp_path):
    out = tmp_path / "out"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        mine = tmp_path / f".out.tmp-{live.pid}"
        mine.mkdir()
        dead = tmp_path / f".out.tmp-{_dead_pid()}"
        dead.mkdir()
        actions = recover_stale(out)
        assert mine.exists() and not dead.exists()
        assert len(actions) == 1 and dead.name in actions[0]
    finally:
        live.kill()
        live.wait()


def test_sigterm_between_renames_puts_the_previous_output_back(tmp_path, monkeypatch):
    out, tmp = tmp_path / "out", tmp_path / ".out.tmp-1"
    out.mkdir()
    (out / "a").write_text("previous")
    tmp.mkdir()
    real_rename = Path.rename

    def rename(self: Path, target: Path) -> Path:
        if self == tmp:
            raise SystemExit(128 + signal.SIGTERM)  # the signal handler fires between the two renames
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(SystemExit):
        replace_output(tmp, out)
    assert (out / "a").read_text() == "previous"
    assert not any(p.name.startswith(".out.old-") for p in tmp_path.iterdir())


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_file_size_limit_gives_one_clear_error_and_no_staging(setup, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(_cmd(setup["model"], setup["calib"], out), capture_output=True, text=True,
                          timeout=600, preexec_fn=_limit_file_size(64 * 1024))  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slmopt: error:"), done.stderr
    assert "file too large" in lines[0]
    assert not out.exists() and _leftovers(out) == []


def test_full_tmpfs_gives_one_clear_error_and_no_staging(setup, tmp_path, capsys):
    """A real ENOSPC on a 64 KiB tmpfs where this machine allows mounting; else a simulated one."""
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                             capture_output=True).returncode == 0  # fmt: skip
    try:
        out = mount / "out"
        if mounted:
            code = main(
                ["compile", str(setup["model"]), "--calib", str(setup["calib"]), *ARGS, "-o", str(out)]
            )
        else:
            with pytest.MonkeyPatch.context() as mp:
                real = artifacts.lower_and_verify

                def full(*args, **kwargs):
                    (args[-1] / "model.onnx").write_bytes(b"partial")
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

                mp.setattr(artifacts, "lower_and_verify", full)
                code = main(["compile", str(setup["model"]), "--calib", str(setup["calib"]), *ARGS, "-o",
                             str(out)])  # fmt: skip
                assert real is not full
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert err.startswith("slmopt: error:") and len(err.splitlines()) == 1, err
        assert "no space left on device" in err
        assert not out.exists() and _leftovers(out) == []
        assert list(mount.iterdir()) == []
    finally:
        if mounted:
            subprocess.run(["umount", str(mount)], check=False)


def test_disk_full_error_finds_the_errno_in_a_chain():
    try:
        try:
            raise OSError(errno.EDQUOT, "quota")
        except OSError as inner:
            raise RuntimeError("onnx save failed") from inner
    except RuntimeError as outer:
        err = disk_full_error(outer, Path("/x"))
    assert err is not None and "disk quota exceeded" in str(err)
    assert disk_full_error(RuntimeError("other"), Path("/x")) is None
    assert disk_full_error(OSError(errno.EACCES, "denied"), Path("/x")) is None
