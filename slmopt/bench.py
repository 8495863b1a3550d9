"""Side-by-side latency measurement: engines interleaved round-robin in one process, medians and ratios.

The machines we measure on are shared and noisy, so absolute times mean little; what matters is the
*ratio* between engines measured under the same conditions. :func:`compare_latency` therefore runs every
engine on the same inputs, one call each per round (rotating which engine goes first, so none always runs
right after a particular other one), and reports median / p10 / p90 per engine and the ratio to the first
engine (the "original"). :func:`bench_model_vs_compiled` sets up the usual comparison: the original model
lowered to the same backend as the compiled folder, both with the same thread count.

Example:
    >>> import torch
    >>> fast, slow = (lambda x: x), (lambda x: torch.sin(x))
    >>> result = compare_latency({"slow": slow, "fast": fast}, (torch.ones(4),), reps=5, progress=False)
    >>> [row.name for row in result.rows()]
    ['slow', 'fast']
"""

from __future__ import annotations

import gc
import json
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from slmopt.loaders import load_program
from slmopt.lowering import MANIFEST, get_backend, load_engine, read_manifest, resolve_backend_name
from slmopt.memory import release_freed_memory
from slmopt.program import ModelInfo, Program

__all__ = [
    "BenchResult",
    "BenchRow",
    "bench_model_vs_compiled",
    "compare_latency",
    "make_inputs",
    "percentile",
]

log = logging.getLogger(__name__)

Runner = Callable[..., Any]


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0–100) with linear interpolation between order statistics (numpy's default).

    Example:
        >>> percentile([1.0, 2.0, 3.0, 4.0], 50)
        2.5
    """
    if not samples:
        raise ValueError("percentile of an empty sample")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class BenchRow:
    """Summary of one engine: times in milliseconds, ``ratio`` = median / first engine's median."""

    name: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    ratio: float
    speedup: float
    max_abs_diff: float | None = None


@dataclass
class BenchResult:
    """Per-rep samples (ms) of each engine, in the order given; the first engine is the reference.

    Attributes:
        samples_ms: engine name → per-rep latencies in milliseconds.
        max_abs_diff: engine name → max |output − first engine's output| on the bench inputs (None where
            shapes differ or the output is not a tensor).
        config: how it was measured (reps, warmup, shapes, threads, ...).
    """

    samples_ms: dict[str, list[float]]
    max_abs_diff: dict[str, float | None] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def reference(self) -> str:
        return next(iter(self.samples_ms))

    def median(self, name: str) -> float:
        return statistics.median(self.samples_ms[name])

    def ratio(self, name: str) -> float:
        """``name``'s median time divided by the reference's (< 1: faster than the reference)."""
        return self.median(name) / self.median(self.reference)

    def rows(self) -> list[BenchRow]:
        ref = self.median(self.reference)
        rows = []
        for name, samples in self.samples_ms.items():
            med = statistics.median(samples)
            rows.append(
                BenchRow(
                    name=name,
                    median_ms=med,
                    p10_ms=percentile(samples, 10),
                    p90_ms=percentile(samples, 90),
                    ratio=med / ref if ref > 0 else math.nan,
                    speedup=ref / med if med > 0 else math.inf,
                    max_abs_diff=self.max_abs_diff.get(name),
                )
            )
        return rows

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: config, the reference's name, one entry per engine (with its samples)."""
        return {
            "config": dict(self.config),
            "reference": self.reference,
            "engines": {
                row.name: {
                    "median_ms": row.median_ms,
                    "p10_ms": row.p10_ms,
                    "p90_ms": row.p90_ms,
                    "ratio": row.ratio,
                    "speedup": row.speedup,
                    "max_abs_diff": row.max_abs_diff,
                    "samples_ms": list(self.samples_ms[row.name]),
                }
                for row in self.rows()
            },
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    def table(self) -> str:
        """An aligned text table; ``speedup`` = reference median / engine median."""
        header = ("engine", "median ms", "p10 ms", "p90 ms", "ratio", "speedup", "max|diff|")
        lines = [header]
        for row in self.rows():
            diff = "-" if row.max_abs_diff is None else f"{row.max_abs_diff:.2e}"
            lines.append(
                (
                    row.name,
                    f"{row.median_ms:.3f}",
                    f"{row.p10_ms:.3f}",
                    f"{row.p90_ms:.3f}",
                    f"{row.ratio:.3f}",
                    f"{row.speedup:.2f}x",
                    diff,
                )
            )
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        out = [
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(line, widths, strict=True))
            )
            for line in lines
        ]
        out.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(out)


def _sync(out: Any) -> None:
    """Waits for CUDA work so the timer sees the whole call (CPU engines return finished results)."""
    if isinstance(out, torch.Tensor) and out.is_cuda:
        torch.cuda.synchronize(out.device)


def _max_abs_diff(ref: Any, out: Any) -> float | None:
    if not (isinstance(ref, torch.Tensor) and isinstance(out, torch.Tensor)) or ref.shape != out.shape:
        return None
    if ref.numel() == 0:
        return 0.0
    return float((out.detach().float().cpu() - ref.detach().float().cpu()).abs().max())


def compare_latency(
    engines: Mapping[str, Runner],
    inputs: Sequence[torch.Tensor],
    warmup: int = 3,
    reps: int = 20,
    progress: bool = True,
    clock: Callable[[], float] = time.perf_counter,
    config: Mapping[str, Any] | None = None,
) -> BenchResult:
    """Times engines interleaved round-robin on the same inputs; the first engine is the reference.

    Each round calls every engine once; the starting engine rotates from round to round. Warm-up rounds
    (fixed order) are not recorded; the first one's outputs give the parity column (max |diff| vs the
    first engine). Python's garbage collector is paused while timing, as ``timeit`` does, so a collection
    triggered by one engine's allocations is not billed to another.

    Args:
        engines: name → callable taking ``*inputs`` (an :class:`~slmopt.lowering.Engine`, a Program, ...).
        inputs: positional inputs passed to every engine.
        warmup: unrecorded rounds first (at least one runs, for the parity check).
        reps: recorded rounds.
        progress: show a progress bar on stderr.
        clock: seconds as a float; injectable so tests can be deterministic.
        config: extra facts to record in ``BenchResult.config`` (threads, shapes, ...).

    Returns:
        A :class:`BenchResult` holding every recorded sample.

    Example:
        >>> # r = compare_latency({"original": orig_engine, "compiled": engine}, (ids,)); print(r.table())
    """
    if not engines:
        raise ValueError("compare_latency needs at least one engine")
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    names = list(engines)
    inputs = tuple(inputs)
    first_out: dict[str, Any] = {}
    for round_ in range(max(warmup, 1)):
        for name in names:
            out = engines[name](*inputs)
            _sync(out)
            if round_ == 0:
                first_out[name] = out
    ref = first_out[names[0]]
    diffs = {name: _max_abs_diff(ref, first_out[name]) for name in names}
    del first_out

    samples: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for round_ in tqdm(range(reps), desc="bench", unit="round", disable=not progress, leave=False):
            for k in range(len(names)):
                name = names[(round_ + k) % len(names)]
                start = clock()
                _sync(engines[name](*inputs))
                samples[name].append((clock() - start) * 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    shapes = [list(x.shape) for x in inputs if isinstance(x, torch.Tensor)]
    meta = {"warmup": warmup, "reps": reps, "input_shapes": shapes, "order": "round-robin, rotating start"}
    meta.update(config or {})
    result = BenchResult(samples_ms=samples, max_abs_diff=diffs, config=meta)
    log.debug("latency:\n%s", result.table())  # callers print or report the table themselves
    return result


def make_inputs(
    info: ModelInfo, example_inputs: Sequence[torch.Tensor], batch: int, seq: int, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Random inputs shaped like the examples, with the ``batch``/``seq`` axes resized.

    Integer inputs (token ids) are drawn from ``[0, info.vocab_size)``; float inputs from a normal.

    Example:
        >>> from slmopt.program import ModelInfo
        >>> info = ModelInfo(kind="causal-lm", source="t", vocab_size=10)
        >>> make_inputs(info, (torch.zeros(2, 16, dtype=torch.long),), batch=1, seq=5)[0].shape
        torch.Size([1, 5])
    """
    if info.max_seq_len and seq > info.max_seq_len:
        raise ValueError(f"seq {seq} exceeds the model's context length {info.max_seq_len}")
    gen = torch.Generator().manual_seed(seed)
    sizes = {"batch": batch, "seq": seq}
    out = []
    for i, x in enumerate(example_inputs):
        # int() because a ModelInfo read back from a JSON manifest has string axis keys.
        axes = (
            {int(a): name for a, name in info.dynamic_dims[i].items()} if i < len(info.dynamic_dims) else {}
        )
        shape = [sizes.get(axes.get(a, ""), n) for a, n in enumerate(x.shape)]
        if x.dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(x.dtype))
        else:
            high = info.vocab_size or int(x.max()) + 1
            out.append(torch.randint(0, high, shape, generator=gen, dtype=x.dtype))
    return tuple(out)


def _original_from_path(path: str | Path, threads: int) -> tuple[Any, ModelInfo, tuple[torch.Tensor, ...]]:
    """An slmopt output folder loads as an engine; anything else is loaded and captured (slmopt.loaders)."""
    if Path(path).is_dir() and (Path(path) / MANIFEST).is_file():
        manifest = read_manifest(path)
        if "model" not in manifest:
            raise ValueError(f"{path}/{MANIFEST} has no model info; cannot make inputs for it")
        return load_engine(path, threads=threads), ModelInfo(**manifest["model"]), ()
    program, _ = load_program(path)
    return program, program.info, program.example_inputs


def bench_model_vs_compiled(
    original: str | Path | Program | Runner,
    compiled_dir: str | Path | Sequence[str | Path],
    threads: int = 1,
    batch: int = 1,
    seq: int = 128,
    backend: str | None = None,
    warmup: int = 3,
    reps: int = 20,
    progress: bool = True,
    info: ModelInfo | None = None,
    inputs: Sequence[torch.Tensor] | None = None,
) -> BenchResult:
    """Times the original model against compiled folder(s), side by side with the same thread count.

    A Program (or a model path, loaded and captured) is first lowered to ``backend`` in a temporary folder
    — by default the (first) compiled folder's own backend — so both sides run in the same runtime with
    the same ``intra_op_num_threads`` / ``torch.set_num_threads``. An engine or callable is used as it is.

    Args:
        original: a Program, a model path (``slmopt.loaders``), an slmopt output folder, or a callable.
        compiled_dir: an slmopt output folder (with ``slmopt.json``), or several.
        threads: intra-op threads for every engine.
        batch: batch size of the bench inputs.
        seq: sequence length of the bench inputs.
        backend: runtime for the original; None = the first compiled folder's backend.
        warmup: unrecorded rounds.
        reps: recorded rounds.
        progress: show a progress bar.
        info: the model's metadata, needed only when ``original`` is a bare callable, ``inputs`` is None
            and the folder's manifest has no model info.
        inputs: explicit bench inputs (override ``batch``/``seq``).

    Returns:
        The :class:`BenchResult` of ``{"original": ..., "compiled": ...}`` (several folders: keyed by
        folder name instead of ``"compiled"``).

    Example:
        >>> # print(bench_model_vs_compiled(program, "out/", threads=1, batch=1, seq=128).table())
    """
    folders = [compiled_dir] if isinstance(compiled_dir, (str, Path)) else list(compiled_dir)
    if not folders:
        raise ValueError("no compiled folder to bench")
    manifests = [read_manifest(folder) for folder in folders]
    backend = resolve_backend_name(backend or manifests[0]["backend"])
    examples: tuple[torch.Tensor, ...] = ()
    if isinstance(original, (str, Path)):
        original, info, examples = _original_from_path(original, threads)
    if isinstance(original, Program):
        info, examples = original.info, original.example_inputs
    if info is None and "model" in manifests[0]:
        info = ModelInfo(**manifests[0]["model"])
    if inputs is None:
        if info is None:
            raise ValueError("pass `inputs` or `info` when the original is a bare callable")
        if not examples and info.kind == "module":
            raise ValueError("a 'module' model takes arbitrary tensors: pass `inputs` to bench it")
        examples = examples or (torch.zeros(2, 2, dtype=torch.long),)  # token ids [batch, seq]
        inputs = make_inputs(info, examples, batch=batch, seq=seq)

    torch.set_num_threads(threads)
    names = ["compiled"] if len(folders) == 1 else _unique_names(folders)
    with tempfile.TemporaryDirectory(prefix="slmopt-bench-") as tmp:
        lowering = get_backend(backend) if isinstance(original, Program) else None
        if lowering is not None:
            # Only the plain graph is timed here: skip the KV-cache decoder export (slmopt.generation.bench).
            lowering.lower(original, Path(tmp), {"generation": False} if backend == "onnxruntime" else {})
            # Lowered before any engine loads, and the Program dropped right after (when this call loaded
            # it), so neither the Program nor the export's temporaries sit under an engine's weights.
            original = None
            release_freed_memory(collect_cycles=True)
        engines: dict[str, Runner] = {}
        # The compiled engines open first and the original's last: opening a session peaks well above
        # what it keeps (constant folding, pre-packing; make_session returns the difference), and an FFF
        # model's session peaks highest (0.97 GB to keep 0.42 on a 135M model, against 0.66 to keep 0.54
        # for the original), so it opens while the least is resident. The timing does not depend on it.
        for name, folder, manifest in zip(names, folders, manifests, strict=True):
            engines[name] = load_engine(folder, threads=threads, **_load_options(manifest["backend"]))
        if lowering is not None:
            original = lowering.load(Path(tmp), threads=threads, **_load_options(backend))
        config = {
            "threads": threads,
            "original_backend": getattr(original, "backend", "") or type(original).__name__,
            "compiled": {name: str(folder) for name, folder in zip(names, folders, strict=True)},
            "compiled_backends": [manifest["backend"] for manifest in manifests],
        }
        return compare_latency(
            {"original": original, **engines},
            inputs,
            warmup=warmup,
            reps=reps,
            progress=progress,
            config=config,
        )


def _unique_names(folders: Sequence[str | Path]) -> list[str]:
    names: list[str] = []
    for folder in folders:
        base = Path(folder).resolve().name or str(folder)
        name, k = base, 2
        while name in names or name == "original":
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def _load_options(backend: str) -> dict[str, Any]:
    # ORT workers that keep spinning after a call would steal the cores the next engine in the round needs.
    return {"allow_spinning": False} if backend in ("onnxruntime", "ort", "onnx") else {}
