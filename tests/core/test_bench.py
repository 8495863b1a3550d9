"""Latency bench logic: interleaving, statistics, ratios, report formats, and the side-by-side helper.

Timing-logic tests use an injected fake clock, so they are exact and fast; one test uses real sleeps
with a loose band. Statistics are checked against numpy, written independently of slmopt.bench.
"""

from __future__ import annotations

import json
import runpy
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from slmopt.bench import BenchResult, bench_model_vs_compiled, compare_latency, make_inputs, percentile
from slmopt.lowering import MANIFEST, get_backend
from slmopt.program import ModelInfo, Program
from tests.models import capture_model

REPO = Path(__file__).resolve().parents[2]


class FakeClock:
    """A clock that only moves when an engine 'runs'."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeEngine:
    """Advances the fake clock by the next duration (seconds) of a cycle, logs its calls."""

    def __init__(
        self, name: str, clock: FakeClock, durations: list[float], log: list[str], value: float
    ) -> None:
        self.name, self.clock, self.durations, self.log, self.value = name, clock, durations, log, value
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.now += self.durations[self.calls % len(self.durations)]
        self.calls += 1
        self.log.append(self.name)
        return x + self.value


def test_compare_latency_is_exact_with_a_fake_clock() -> None:
    clock, calls = FakeClock(), []
    slow_ms = [5.0, 1.0, 3.0, 2.0, 4.0, 9.0, 6.0]
    # The first `warmup` calls are not recorded: prefix the cycle so recorded samples are slow_ms exactly.
    a = FakeEngine("a", clock, [d / 1e3 for d in [100.0, 100.0] + slow_ms], calls, 0.0)
    b = FakeEngine("b", clock, [0.5e-3], calls, 0.25)
    result = compare_latency(
        {"a": a, "b": b}, (torch.zeros(3),), warmup=2, reps=len(slow_ms), progress=False, clock=clock
    )
    assert result.samples_ms["a"] == pytest.approx(slow_ms)
    assert result.samples_ms["b"] == pytest.approx([0.5] * len(slow_ms))
    assert result.median("a") == pytest.approx(float(np.median(slow_ms)))
    rows = {row.name: row for row in result.rows()}
    assert rows["a"].p10_ms == pytest.approx(float(np.percentile(slow_ms, 10)))
    assert rows["a"].p90_ms == pytest.approx(float(np.percentile(slow_ms, 90)))
    assert rows["a"].ratio == 1.0 and rows["a"].max_abs_diff == 0.0
    assert rows["b"].ratio == pytest.approx(0.5 / np.median(slow_ms))
    assert rows["b"].speedup == pytest.approx(np.median(slow_ms) / 0.5)
    assert rows["b"].max_abs_diff == pytest.approx(0.25)  # parity vs the first engine
    assert result.reference == "a"
    assert a.calls == b.calls == 2 + len(slow_ms)


def test_compare_latency_interleaves_round_robin_with_rotating_start() -> None:
    clock, calls = FakeClock(), []
    engines = {n: FakeEngine(n, clock, [1e-3], calls, 0.0) for n in "xyz"}
    compare_latency(engines, (torch.zeros(1),), warmup=1, reps=4, progress=False, clock=clock)
    recorded = calls[3:]  # after one warm-up round
    rounds = [recorded[i : i + 3] for i in range(0, len(recorded), 3)]
    assert rounds == [list("xyz"), list("yzx"), list("zxy"), list("xyz")]


def test_compare_latency_real_sleeps_give_the_expected_ratio() -> None:
    engines = {"slow": lambda: time.sleep(0.006), "fast": lambda: time.sleep(0.002)}
    result = compare_latency(engines, (), warmup=1, reps=12, progress=False)
    assert 0.15 < result.ratio("fast") < 0.6  # 1/3 expected; sleep overshoot and noise stay in the band
    assert result.max_abs_diff == {"slow": None, "fast": None}  # no tensor outputs to compare


def test_percentile_matches_numpy() -> None:
    gen = np.random.default_rng(0)
    for n in (1, 2, 5, 20):
        xs = gen.exponential(size=n).tolist()
        for q in (0, 10, 50, 90, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    with pytest.raises(ValueError):
        percentile([], 50)


def test_table_and_json() -> None:
    result = BenchResult(
        samples_ms={"original": [2.0, 4.0, 3.0], "compiled-long-name": [1.0, 1.5, 2.0]},
        max_abs_diff={"original": 0.0, "compiled-long-name": 1e-5},
        config={"threads": 1},
    )
    lines = result.table().splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1  # header, rule, 2 rows; aligned
    assert lines[0].split()[0] == "engine" and lines[3].startswith("compiled-long-name")
    assert "2.00x" in lines[3]  # speedup = 3.0 / 1.5
    data = json.loads(result.to_json())
    assert data["reference"] == "original" and data["config"] == {"threads": 1}
    assert data["engines"]["compiled-long-name"]["ratio"] == pytest.approx(0.5)
    assert data["engines"]["original"]["samples_ms"] == [2.0, 4.0, 3.0]
    assert result.to_dict() == data


def test_make_inputs() -> None:
    info = ModelInfo(kind="causal-lm", source="t", vocab_size=11, max_seq_len=64)
    (ids,) = make_inputs(info, (torch.zeros(2, 16, dtype=torch.long),), batch=3, seq=40)
    assert ids.shape == (3, 40) and ids.dtype == torch.long and ids.min() >= 0 and ids.max() < 11
    block = ModelInfo(kind="module", source="t", input_names=["x"], dynamic_dims=[{0: "batch", 1: "seq"}])
    (x,) = make_inputs(block, (torch.zeros(2, 16, 8),), batch=1, seq=5)
    assert x.shape == (1, 5, 8) and x.dtype == torch.float32
    with pytest.raises(ValueError, match="context length"):
        make_inputs(info, (torch.zeros(2, 16, dtype=torch.long),), batch=1, seq=65)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Program, dict[str, Path]]:
    """The tiny zoo LM and slmopt folders of it for both backends (manifest as slmopt.compile writes)."""
    program = capture_model("tiny")
    folders = {}
    for backend in ("onnxruntime", "torch"):
        out = tmp_path_factory.mktemp(f"compiled-{backend}")
        lowered = get_backend(backend).lower(program, out, {})
        manifest = {
            "backend": lowered.backend,
            "artifacts": lowered.artifacts,
            "model": program.info.to_dict(),
        }
        (out / MANIFEST).write_text(json.dumps(manifest))
        folders[backend] = out
    return program, folders


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_bench_model_vs_compiled_side_by_side(tiny: tuple[Program, dict[str, Path]], backend: str) -> None:
    program, folders = tiny
    folder = folders[backend]
    result = bench_model_vs_compiled(
        program, folder, threads=1, batch=1, seq=24, warmup=1, reps=3, progress=False
    )
    assert list(result.samples_ms) == ["original", "compiled"]
    assert all(len(s) == 3 and min(s) > 0 for s in result.samples_ms.values())
    assert result.config["threads"] == 1 and result.config["input_shapes"] == [[1, 24]]
    assert result.config["original_backend"] == backend  # the original was lowered like the folder
    assert result.max_abs_diff["compiled"] <= 1e-4  # same model on both sides


def test_cli_script(
    tiny: tuple[Program, dict[str, Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tiny[1]["onnxruntime"]
    main = runpy.run_path(str(REPO / "benchmarks" / "bench_latency.py"))["main"]
    out_json = tmp_path / "bench.json"
    # The original is another slmopt folder here (no re-capture needed), benched against two folders.
    argv = [str(folder), str(folder), str(folder), "--seq", "8", "--reps", "2", "--warmup", "1"]
    assert main([*argv, "--json", str(out_json), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "original" in table and "speedup" in table
    data = json.loads(out_json.read_text())
    assert len(data["engines"]) == 3 and data["config"]["input_shapes"] == [[1, 8]]
    assert main([str(tmp_path / "nope"), str(tmp_path), "--no-progress"]) == 2


def test_bench_opens_the_compiled_engines_before_the_original(
    tiny: tuple[Program, dict[str, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory (issue 14): the FFF engine's session peaks highest while it opens, so it opens first, with
    only the lowered original's files (not its session) resident; and every ORT session returns the heap
    its constant folding freed (make_session trims)."""
    import slmopt.bench as bench_module
    from slmopt.backends.onnxrt import session as session_module

    program, folders = tiny
    opened: list[str] = []
    real_load_engine = bench_module.load_engine
    real_release = session_module.release_freed_memory

    def load_engine(folder, **kwargs):
        opened.append("compiled engine" if Path(folder) == folders["onnxruntime"] else "other engine")
        return real_load_engine(folder, **kwargs)

    def release() -> bool:  # make_session's heap trim, right after a session opened
        opened.append("session opened")
        return real_release()

    monkeypatch.setattr(bench_module, "load_engine", load_engine)
    monkeypatch.setattr(session_module, "release_freed_memory", release)
    result = bench_model_vs_compiled(
        program, folders["onnxruntime"], threads=1, batch=1, seq=8, warmup=1, reps=1, progress=False
    )
    assert result.max_abs_diff["compiled"] <= 1e-4
    # Nothing opened before the compiled engine; then its session, then the original's.
    assert opened == ["compiled engine", "session opened", "session opened"], opened
