"""Distributed compile (torch.distributed, gloo, 2 local processes) against the single-process run.

The 2-rank run is launched with ``torchrun`` exactly as a user would (through ``slmopt.cli``, see
``tests/core/dist_worker.py``); the single-process reference runs the same commands without it. The
artifacts' ONNX initializers are compared tensor by tensor:

* ``prune-attn`` (loss importance, low-rank recovery fits) + ``mask-2to4{method=sparsegpt}``:
  byte-identical (and cosine importance scores: equal floats in the report). Calibration shards are
  batch-aligned and each rank holds one batch, so every rank computes the single process's per-batch
  sums and the 2-way all-reduce adds them in the same order.
* ``elastic``: byte-identical. Head/neuron/block statistics are sharded and all-reduced like the above;
  candidate plans are scored on the same rows on every rank, so the search picks the same plan everywhere.
* ``fff``: the router/leaf data is all-gathered (identical trees before distillation); distillation
  sums gradients of half-minibatches across ranks, which reorders float32 sums, so weights agree to
  :data:`FFF_RTOL` of each tensor's scale (measured: ≤ 6e-6 absolute).

A rank that dies mid-calibration must make the run fail with one clear line and leave no output. The
collective helpers themselves are checked on two spawned gloo ranks (variable-size gather, gradient sums).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from slmopt import distributed
from slmopt.cli import main
from slmopt.errors import UserError
from tests.helpers import save_token_ids
from tests.models import save_hf

WORKER = Path(__file__).with_name("dist_worker.py")
EXACT = {
    "sparsegpt": "prune-attn{remove=1,protect=(),metric=loss,recover=lowrank},mask-2to4{method=sparsegpt}",
}
FFF_RTOL = 1e-4  # |dist - single| <= FFF_RTOL * max|single| per tensor (gradient sums reordered)
# Cosine importance rides along with fff (one compile fewer): its scores are compared exactly in the report.
APPROX = {"fff": "prune-attn{remove=1,protect=(),recover=bias},fff{distill_steps=10,distill_seconds=600}"}
# Multi-subnet output: the ONNX file is <out>/subnet-0.5/model.onnx.
ELASTIC = {"elastic": "elastic{budgets=0.5}"}
JOBS = EXACT | APPROX | ELASTIC


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return env | {"OMP_NUM_THREADS": "1", distributed.ENV_TIMEOUT: "60"} | extra


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dist")
    model = save_hf("llama", root / "llama")
    calib = root / "calib.npy"
    save_token_ids(calib, 4096)
    return model, calib


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory) -> tuple[Path, Path]:
    """Single-process and 2-rank runs of every pipeline, launched side by side (they are independent)."""
    model, calib = setup
    root = tmp_path_factory.mktemp("runs")
    jobs = [f"{name}={p}" for name, p in JOBS.items()]
    args = [str(WORKER), str(model), str(calib)]
    single = subprocess.Popen(
        [sys.executable, *args, str(root / "single"), *jobs], env=_env(), stderr=subprocess.PIPE, text=True
    )
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launch += ["--master_port", str(_free_port())]
    multi = subprocess.Popen(
        [*launch, *args, str(root / "multi"), *jobs], env=_env(), stderr=subprocess.PIPE, text=True
    )
    errors = [p.communicate(timeout=600)[1] for p in (single, multi)]
    assert single.returncode == 0, errors[0][-3000:]
    assert multi.returncode == 0, errors[1][-3000:]
    return root / "single", root / "multi"


@pytest.mark.parametrize("name", sorted(EXACT))
def test_two_ranks_give_byte_identical_onnx(runs, name):
    single, multi = runs
    a, b = _initializers(single / name / "model.onnx"), _initializers(multi / name / "model.onnx")
    assert a.keys() == b.keys()
    different = [k for k in a if a[k].tobytes() != b[k].tobytes()]
    assert not different, f"initializers differ: {different}"
    # Only rank 0 wrote: exactly the single run's file set, no staging leftovers from any rank.
    files = [sorted(p.name for p in (run / name).iterdir()) for run in (single, multi)]
    assert files[0] == files[1]
    assert sorted(p.name for p in multi.iterdir()) == sorted(JOBS)


def test_two_ranks_elastic_identical(runs):
    single, multi = runs
    onnx_file = Path("elastic") / "subnet-0.5" / "model.onnx"
    a, b = _initializers(single / onnx_file), _initializers(multi / onnx_file)
    assert a.keys() == b.keys()
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_two_ranks_fff_within_tolerance(runs):
    single, multi = runs
    reports = [json.loads((run / "fff" / "report.json").read_text())["passes"] for run in (single, multi)]
    importance = [r[0]["metrics"]["importance"] for r in reports]
    assert importance[0] == importance[1]  # cosine scores: the same floats, the same layer removed
    assert [r[1]["metrics"]["layers"][0]["tokens"] for r in reports] == [512, 512]  # all rows gathered
    a, b = _initializers(single / "fff" / "model.onnx"), _initializers(multi / "fff" / "model.onnx")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
        if not np.issubdtype(a[key].dtype, np.floating):
            assert np.array_equal(a[key], b[key]), key  # routing tables, shapes: exact
            continue
        finite = np.isfinite(a[key])
        assert np.array_equal(finite, np.isfinite(b[key])), key
        scale = float(np.abs(a[key][finite]).max(initial=0.0))
        diff = float(np.abs(a[key][finite].astype(np.float64) - b[key][finite]).max(initial=0.0))
        assert diff <= FFF_RTOL * max(scale, 1e-6), (key, diff, scale)


def test_dead_rank_fails_the_run_without_output(setup, tmp_path):
    """Rank 1 exits abruptly during calibration: rank 0 reports it in one line and writes nothing."""
    model, calib = setup
    out = tmp_path / "out"
    port = str(_free_port())
    cmd = [sys.executable, "-m", "slmopt.cli", "compile", str(model), "--passes",
           "mask-2to4{method=sparsegpt}", "--calib", str(calib), "--seq-len", "32", "--num-samples", "16",
           "--no-bench", "--no-progress", "-o", str(out), "--distributed"]  # fmt: skip
    procs = []
    for rank in (0, 1):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, **{distributed.ENV_KILL_RANK: "1"})  # fmt: skip
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert procs[1].returncode == 1
    assert procs[0].returncode == 1, errors[0][-3000:]
    last = errors[0].strip().splitlines()[-1]
    assert last.startswith("slmopt: error: rank 0 of 2:"), errors[0][-3000:]
    assert "another rank died or stopped responding" in last
    assert "Traceback" not in errors[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "staging folder left behind"


def test_distributed_flag_without_launcher_is_one_clear_error(setup, tmp_path, capsys, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    model, calib = setup
    code = main(["compile", str(model), "--calib", str(calib), "-o", str(tmp_path / "o"), "--distributed"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("slmopt: error: --distributed needs the environment torchrun sets"), err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_shards_are_batch_aligned_contiguous_and_cover_everything(monkeypatch):
    rows = torch.arange(41)
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    parts = []
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        parts.append(distributed.shard_rows(rows, align=8))
    assert torch.equal(torch.cat(parts), rows)  # contiguous, in order, nothing lost or repeated
    assert all(len(p) % 8 == 0 for p in parts[:-1])  # boundaries fall on calibration batches
    assert [len(p) for p in parts] == [16, 16, 9]  # 6 batches of 8 (last partial) split 2/2/2
    with pytest.raises(UserError, match="fewer than the 3 ranks"):
        distributed.shard_rows(torch.arange(16), align=8)


def test_single_process_collectives_are_identities():
    t = torch.randn(3, 4)
    assert distributed.all_reduce_sum(t.clone()).equal(t)
    assert distributed.all_gather_rows(t).equal(t)
    assert distributed.shard_rows(t, align=2).equal(t)
    assert distributed.rank0_decides("x") == "x"
    assert distributed.all_reduce_floats([1.5, 2]) == [1.5, 2.0]
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)


def _collectives_rank(rank: int, port: int, out: Path) -> None:
    """One of 2 spawned ranks: exercises each collective helper and saves what it saw."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    assert distributed.init(backend="gloo", timeout=60)
    try:
        grad = torch.nn.Parameter(torch.zeros(3))
        grad.grad = torch.full((3,), rank + 1.0)
        distributed.sum_gradients([grad])
        seen = {
            # variable-size shards: rank r contributes r+1 rows of value r
            "gathered": distributed.all_gather_rows(torch.full((rank + 1, 2), float(rank))),
            "shard": distributed.shard_rows(torch.arange(20), align=4),
            "decided": distributed.rank0_decides(f"rank{rank}"),
            "floats": distributed.all_reduce_floats([rank, 0.5]),
            "grad": grad.grad,
        }
        torch.save(seen, out / f"{rank}.pt")
    finally:
        distributed.shutdown()


def test_collective_helpers_on_two_gloo_ranks(tmp_path):
    torch.multiprocessing.spawn(_collectives_rank, args=(_free_port(), tmp_path), nprocs=2)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in (0, 1)]
    expected_rows = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    for seen in ranks:
        assert torch.equal(seen["gathered"], expected_rows)  # rank order, padding removed
        assert seen["decided"] == "rank0"
        assert seen["floats"] == [1.0, 1.0]
        assert torch.equal(seen["grad"], torch.full((3,), 3.0))  # 1 + 2 on every rank
    # 20 rows = 5 batches of 4: rank 0 takes round(2.5) = 2 batches, rank 1 the other 3.
    assert torch.equal(torch.cat([ranks[0]["shard"], ranks[1]["shard"]]), torch.arange(20))
    assert len(ranks[0]["shard"]) == 8
