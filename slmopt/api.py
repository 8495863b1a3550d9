"""Python API: ``slmopt.compile`` — load, capture, run the pass pipeline, lower, verify, report.

Example:
    >>> import slmopt
    >>> # result = slmopt.compile("path/to/model", passes="mask-2to4{method=wanda}", calib="calib.txt",
    >>> #                         backend="onnxruntime", output_dir="out/")
    >>> # result.report.parity["max_abs_diff"] <= 1e-4
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slmopt import distributed
from slmopt.atomic import disk_full_error, recover_stale
from slmopt.data.quality import ModelData, evaluate_quality, load_model_data
from slmopt.errors import PassError, UserError
from slmopt.loaders import LoadedModel, load_program
from slmopt.lowering import MANIFEST, get_backend, resolve_backend_name
from slmopt.memory import release_freed_memory
from slmopt.pipeline.instruments import DumpGraph, TimePasses, VerifyEach
from slmopt.pipeline.manager import PassContext, PassManager
from slmopt.pipeline.parse import Pipeline, parse_pipeline
from slmopt.program import Program
from slmopt.report import CompileReport
from slmopt.verification import artifact_checks, bench_latency, parity

__all__ = ["CompileOptions", "CompileResult", "compile"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompileOptions:
    """Options of one compile run (every CLI flag of ``slmopt compile`` maps to one field; ``keep_program``
    is for API callers: the CLI never reads the returned Program and passes False)."""

    passes: str = ""
    backend: str = "onnxruntime"
    output_dir: str | None = None
    force: bool = False
    calib: str | None = None
    eval: str | None = None
    seq_len: int = 256
    num_samples: int = 64
    eval_samples: int = 64
    seed: int = 0
    threads: int | None = None
    dump_graph: str | None = None
    time_passes: bool = False
    verify_each: bool = False
    bench: bool = True
    parity_tolerance: float = 1e-4
    progress: bool = True
    replay: str | None = None  # report.json of an earlier elastic run: reuse its decisions, no scoring
    # False: drop the transformed Program once it is written and verified (CompileResult.program is then
    # None), so the latency bench's two engines do not sit on top of it. The CLI needs only the files.
    keep_program: bool = True
    backend_options: dict[str, Any] = field(default_factory=dict)
    distributed: bool | None = None  # None: join torch.distributed when torchrun set WORLD_SIZE > 1

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise UserError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.num_samples < 1 or self.eval_samples < 1:
            raise UserError("num_samples and eval_samples must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"threads must be >= 1, got {self.threads}")
        resolve_backend_name(self.backend)


@dataclass
class CompileResult:
    program: Program | None  # None with keep_program=False and an output folder
    report: CompileReport
    artifacts: dict[str, Path]
    output_dir: Path | None
    # Fan-out pipelines (elastic): {name: (program, pass reports after the fan-out)}.
    variants: dict[str, Any] = field(default_factory=dict)


def _check_output(options: CompileOptions, model: Any) -> Path | None:
    if options.output_dir is None:
        return None
    out = Path(options.output_dir).expanduser().resolve()
    recover_stale(out)  # before the exists check: a SIGKILLed --force swap may have parked the old output
    if out.exists() and not options.force:
        raise UserError(f"output folder {out} exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a folder")
    if isinstance(model, (str, Path)) and Path(model).exists():
        src = Path(model).expanduser().resolve()
        # Writing inside a model folder would add files to it; --force on an ancestor would delete it.
        inside = src.is_dir() and src in out.parents
        if out == src or inside or out in src.parents:
            raise UserError(f"output folder {out} overlaps the input model {src}; choose another folder")
    return out


def _instruments(options: CompileOptions) -> list[Any]:
    table = [
        (options.dump_graph, lambda: DumpGraph(options.dump_graph)),
        (options.time_passes, TimePasses),
        (options.verify_each, VerifyEach),
    ]
    return [make() for wanted, make in table if wanted]


def compile(  # noqa: A001 - the public name users expect: slmopt.compile
    model: str | Path | nn.Module,
    passes: str | Pipeline = "",
    *,
    output_dir: str | Path | None = None,
    **kwargs: Any,
) -> CompileResult:
    """Compiles a model: capture → passes → lower → verify → report.

    Args:
        model: a Hugging Face folder, a ``.pt2`` file, ``package.module:factory`` or an ``nn.Module``.
        passes: a pipeline string such as ``"mask-2to4{method=sparsegpt}"`` (or a parsed Pipeline).
        output_dir: where artifacts go (written atomically); None keeps the result in memory only.
        **kwargs: any other :class:`CompileOptions` field (``calib``, ``eval``, ``backend``, ``force``...).

    Returns:
        CompileResult with the transformed Program, the report and the artifact paths.

    Raises:
        UserError: bad input (missing model, unknown pass, output exists...), before anything is written.
    """
    valid = {f.name for f in fields(CompileOptions)}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise TypeError(f"compile() got unknown options {unknown}; valid: {', '.join(sorted(valid))}")
    pipeline = passes if isinstance(passes, Pipeline) else parse_pipeline(passes) if passes else Pipeline()
    if kwargs.get("replay"):
        pipeline = _replay_pipeline(pipeline, kwargs["replay"])
    options = CompileOptions(
        passes=str(pipeline), output_dir=str(output_dir) if output_dir is not None else None, **kwargs
    )
    out = _check_output(options, model)
    if out is not None:
        get_backend(options.backend).check_available()  # e.g. TensorRT without a GPU: fail before loading
    started = time.perf_counter()
    if options.threads:
        torch.set_num_threads(options.threads)

    distributed.join(options.distributed)  # torchrun's process group, if asked for or launched so
    program, loaded = load_program(model)
    reloadable = isinstance(model, (str, Path))  # the bench can load the original again from its source
    # The Program now holds the weights (sharing the loader's tensors): drop the eager module, or every
    # weight a pass replaces would stay alive through it — a second copy of the model during the passes.
    loaded.module = None
    data = load_model_data(loaded.info, options)
    with _staging(out if distributed.is_main() else None) as staging:  # only rank 0 writes
        ctx = PassContext(
            calib=data.calib,
            seed=options.seed,
            threads=options.threads,
            backend=resolve_backend_name(options.backend),
            progress=options.progress and distributed.is_main(),
            instruments=_instruments(options),
            extras={"tokenizer": data.tokenizer, "eval_tokens": data.eval, "artifact_dir": staging},
        )
        torch.manual_seed(options.seed)
        try:
            manager = PassManager(pipeline)
            params_before = program.num_params()
            transformed, pass_reports = manager.run(
                program, ctx, in_place=not _needs_original(options, pipeline, reloadable)
            )
        except PassError as err:  # a dead peer: say so in one line, not as a failure of the pass
            if isinstance(err.cause, distributed.DistributedError):
                raise err.cause from None
            raise
        # Every rank must have finished the passes before rank 0 commits anything (others then return).
        distributed.barrier("the final status exchange")
        for inst in ctx.instruments:
            if isinstance(inst, TimePasses):
                log.info("pass timings:\n%s", inst.table())
        report = CompileReport(
            pipeline=str(pipeline),
            source=loaded.info.source,
            backend=ctx.backend,
            model=loaded.info.to_dict() | {"config": None},
            passes=[r.to_dict() for r in pass_reports],
            params_before=params_before,
            params_after=transformed.num_params(),
        )
        artifacts: dict[str, Path] = {}
        if not _reads_original_after_passes(options, reloadable):
            # Nothing compares against the original any more (the bench re-loads it from its source):
            # release it so that lowering does not run with two copies of the model in memory. After an
            # in-place pipeline this name held the transformed Program, which is no original either.
            program = ctx.reference = None
        release_freed_memory(collect_cycles=True)  # the passes' garbage must not sit under the lowering
        if staging is not None and out is not None and manager.variants:
            _write_subnets(program, manager, pass_reports, loaded, data, options, report, staging)
            report.seconds = time.perf_counter() - started
            report.write(staging)
            _replace(staging, out)
            artifacts = {row["budget"]: out / row["folder"] for row in report.subnets}
        elif staging is not None and out is not None:
            lowered = _lower_and_verify(
                program, transformed, pipeline, loaded, data, options, report, staging
            )
            if not options.keep_program:
                transformed = None  # written and verified: the bench needs only the files
            report.latency = bench_latency(program, staging, loaded, options)
            report.seconds = time.perf_counter() - started
            report.write(staging)
            _replace(staging, out)
            artifacts = {name: out / rel for name, rel in lowered.items()}
    report.seconds = time.perf_counter() - started
    out = out if distributed.is_main() else None
    return CompileResult(
        program=transformed, report=report, artifacts=artifacts, output_dir=out, variants=manager.variants
    )


# Passes that compare against the untouched input (ctx.reference): distillation's teacher.
_PASSES_NEEDING_ORIGINAL = frozenset({"distill"})


def _reads_original_after_passes(options: CompileOptions, reloadable: bool) -> bool:
    """Whether lowering/verification reads the original Program held in memory.

    The quality comparison does; the latency bench only needs the original's *graph*, which it loads
    again from the model's source (a path or ``module:factory``) after the transformed Program is lowered,
    so an in-memory copy is kept for it only when the model came in as an ``nn.Module``.
    """
    return options.eval is not None or (options.bench and not reloadable)


def _needs_original(options: CompileOptions, pipeline: Pipeline, reloadable: bool) -> bool:
    """Whether anything after (or during) the passes reads the original Program.

    When nothing does, the pipeline rewrites the loaded Program in place instead of a copy, so a compile
    never holds two copies of the model's weights (the loader's Program is private to this call).
    """
    uses = (
        _reads_original_after_passes(options, reloadable),  # quality (and latency) before/after
        options.verify_each,  # max |diff| vs the original after each pass
        any(p.name in _PASSES_NEEDING_ORIGINAL for p in pipeline.passes),
    )
    return any(uses)


def _replay_pipeline(pipeline: Pipeline, path: str) -> Pipeline:
    """The pipeline of an earlier run (unless one is given) with ``elastic{replay=path}`` set."""
    from dataclasses import replace

    try:
        recorded = json.loads(Path(path).expanduser().read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read replay report {path}: {err}") from None
    if not pipeline.passes:
        pipeline = parse_pipeline(recorded.get("pipeline", ""))
    elastic = [p for p in pipeline.passes if p.name == "elastic"]
    if not elastic:
        raise UserError("--replay needs an elastic pass in the pipeline")
    elastic[0].config = replace(elastic[0].config, replay=str(Path(path).expanduser().resolve()))
    return pipeline


def _write_subnets(
    original: Program | None,
    manager: PassManager,
    pass_reports: list[Any],
    loaded: LoadedModel,
    data: ModelData,
    options: CompileOptions,
    report: CompileReport,
    staging: Path,
) -> None:
    """Lowers every fan-out variant into ``staging/subnet-<name>/`` and fills the top-level table."""
    from slmopt.passes.elastic.report import subnet_row, write_pareto

    fanned = pass_reports[-1]
    for name, (program, reports) in manager.variants.items():
        folder = staging / f"subnet-{name}"
        folder.mkdir()
        sub = CompileReport(
            pipeline=report.pipeline,
            source=report.source,
            backend=report.backend,
            model=report.model,
            passes=[r.to_dict() for r in [*pass_reports, *reports]],
            params_before=report.params_before,
            params_after=program.num_params(),
        )
        _lower_and_verify(original, program, manager.pipeline, loaded, data, options, sub, folder)
        sub.latency = bench_latency(original, folder, loaded, options)
        sub.write(folder)
        report.subnets.append(subnet_row(name, folder, sub, fanned.metrics, options))
        if sub.quality and not report.quality:  # the original model's held-out quality, once
            report.quality = {"before": sub.quality["before"], "after": {}}
    pareto = write_pareto(report.subnets, staging)
    report.artifacts = {"pareto": pareto} if pareto else {}


@contextmanager
def _staging(out: Path | None) -> Iterator[Path | None]:
    """A temporary sibling of ``out`` that everything is written into; removed if anything fails.

    Renaming it into place at the end is what makes an interrupted run leave no half-written output.
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


def _lower_and_verify(
    original: Program | None,
    program: Program,
    pipeline: Pipeline,
    loaded: LoadedModel,
    data: ModelData,
    options: CompileOptions,
    report: CompileReport,
    folder: Path,
) -> dict[str, str]:
    """Lowers into ``folder``, loads the engine back, checks parity/artifacts and measures quality."""
    backend = get_backend(options.backend)
    lowered = backend.lower(program, folder, dict(options.backend_options))
    release_freed_memory()  # export temporaries, before the engine's session is opened
    report.artifacts = dict(lowered.artifacts)
    report.lowering = lowered.metadata
    manifest = {
        "backend": lowered.backend,
        "artifacts": lowered.artifacts,
        "pipeline": report.pipeline,
        "model": loaded.info.to_dict(),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    engine = backend.load(folder, threads=options.threads)
    report.parity = parity(program, engine, data, options.parity_tolerance)
    report.checks = artifact_checks(pipeline, report, folder, set(program.graph_module.state_dict()))
    if data.eval is not None:
        report.quality = evaluate_quality(original, engine, data, progress=options.progress)
    return dict(lowered.artifacts)


def _replace(tmp: Path, out: Path) -> None:
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
