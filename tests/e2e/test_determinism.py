"""Same seed, same inputs, same thread count → byte-identical ``model.onnx`` and identical reports.

One compile per pass runs in this process and one in a child process with a different ``PYTHONHASHSEED``
(so set/dict iteration that depends on string hashing would show up); the two must agree byte for byte on
every ONNX file and on every report once the volatile fields (:data:`VOLATILE_KEYS`) are removed.

``DETERMINISM_CASES`` must name every registered pass: a new pass without a case fails
``test_every_pass_has_a_determinism_case``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from slmopt.pipeline.pass_base import BUILTIN_PASSES
from tests.helpers import save_token_ids

# pass name -> the smallest pipeline that exercises it on the tiny llama (every random choice seeded).
DETERMINISM_CASES: dict[str, str] = {
    "mask-2to4": "mask-2to4{method=sparsegpt}",
    "prune-attn": "prune-attn{remove=1,recover=lowrank}",
    "fff": "fff{depth=1,distill_steps=10}",
    # distill needs a changed program to pull back toward the original.
    "distill": "prune-attn{remove=1},distill{steps=3}",  # default: no time budget, steps bind
    "elastic": "elastic{budgets=0.6,samples=8,score_samples=4,refine=0}",
}

# Report fields that measure the machine, not the result: dropped (at any depth) before comparing.
VOLATILE_KEYS = frozenset({"seconds", "latency", "versions", "timings", "ms_per_token"})
VOLATILE_SUFFIXES = ("_seconds", "_ms", "_time")

COMPILE_KWARGS: dict[str, Any] = {
    "seq_len": 32,
    "num_samples": 8,
    "seed": 0,
    "threads": 1,  # reductions are thread-count dependent: compare like with like
    "bench": False,
    "progress": False,
    "backend_options": {"generation": False},
}


def strip_volatile(obj: Any) -> Any:
    """``obj`` without :data:`VOLATILE_KEYS` / keys ending in :data:`VOLATILE_SUFFIXES`, at any depth."""
    if isinstance(obj, dict):
        return {
            k: strip_volatile(v)
            for k, v in obj.items()
            if k not in VOLATILE_KEYS and not str(k).endswith(VOLATILE_SUFFIXES)
        }
    if isinstance(obj, list):
        return [strip_volatile(v) for v in obj]
    return obj


def compile_case(model: Path, calib: Path, name: str, out: Path) -> None:
    import slmopt

    slmopt.compile(str(model), DETERMINISM_CASES[name], output_dir=out, calib=str(calib), **COMPILE_KWARGS)


def compile_all(model: str, calib: str, root: str) -> None:
    """Entry point of the child process: every case into ``root/<name>``."""
    for name in DETERMINISM_CASES:
        compile_case(Path(model), Path(calib), name, Path(root) / name)


def fingerprint(folder: Path) -> dict[str, Any]:
    """sha256 of every ONNX file (and its external data) plus the stripped JSON reports, by relative path."""
    found: dict[str, Any] = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if ".onnx" in path.name:
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.suffix == ".json":
            found[rel] = strip_volatile(json.loads(path.read_text()))
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    from tests.models import save_hf

    root = tmp_path_factory.mktemp("determinism")
    model = save_hf("llama", root / "model")
    calib = root / "calib.npy"
    save_token_ids(calib, (8, 32), vocab=128)
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    code = f"from tests.e2e.test_determinism import compile_all; compile_all({str(model)!r}, {str(calib)!r}, {str(root / 'b')!r})"
    # The child runs while this process compiles the same cases: the two cores work in parallel.
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
    try:
        for name in DETERMINISM_CASES:
            compile_case(model, calib, name, root / "a" / name)
    finally:
        _, err = child.communicate(timeout=900)
    assert child.returncode == 0, err[-3000:]
    return {"a": root / "a", "b": root / "b"}


def test_every_pass_has_a_determinism_case():
    # The shipped passes (other tests register throwaway passes in this process; they are not shipped).
    missing = sorted(set(BUILTIN_PASSES) - set(DETERMINISM_CASES))
    assert not missing, f"add a DETERMINISM_CASES entry for {missing}"


def test_strip_volatile_drops_timings_at_any_depth():
    report = {"seconds": 1.0, "passes": [{"name": "fff", "distill_seconds": 2.0, "metrics": {"loss": 0.5}}]}
    assert strip_volatile(report) == {"passes": [{"name": "fff", "metrics": {"loss": 0.5}}]}


@pytest.mark.parametrize("name", sorted(DETERMINISM_CASES))
def test_compile_is_byte_identical_across_processes(runs, name):
    first, second = fingerprint(runs["a"] / name), fingerprint(runs["b"] / name)
    assert any(".onnx" in rel for rel in first), sorted(first)
    assert "report.json" in first
    assert first.keys() == second.keys()
    for rel in first:
        assert first[rel] == second[rel], f"{name}: {rel} differs between two runs with the same seed"
