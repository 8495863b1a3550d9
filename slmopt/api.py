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
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slmopt import artifacts as artifacts_module
from slmopt import distributed
from slmopt.atomic import recover_stale, replace_output, staging_folder
from slmopt.data.quality import load_model_data
from slmopt.errors import PassError, UserError
from slmopt.loaders import load_program
from slmopt.lowering import DEFAULT_BACKEND, get_backend, resolve_backend_name
from slmopt.memory import release_freed_memory
from slmopt.pipeline.instruments import DumpGraph, TimePasses, VerifyEach
from slmopt.pipeline.manager import PassContext, PassManager
from slmopt.pipeline.parse import Pipeline, parse_pipeline
from slmopt.pipeline.pass_base import all_pass_names, get_pass_class
from slmopt.program import Program
from slmopt.report import CompileReport
from slmopt.verification import bench_latency

__all__ = ["CompileOptions", "CompileResult", "compile"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompileOptions:
    """Options of one compile run (every CLI flag of ``slmopt compile`` maps to one field; ``keep_program``
    is for API callers: the CLI never reads the returned Program and passes False)."""

    passes: str = ""
    backend: str = DEFAULT_BACKEND
    output_dir: str | None = None
    force: bool = False
    calib: str | None = None
    eval: str | None = None
    seq_len: int | None = None  # None: text in windows of 256 tokens, 2-D token-id rows as given
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
        if self.seq_len is not None and self.seq_len < 2:
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
    program, loaded = load_program(model, calib=options.calib)
    # The bench can load the original again from its source (not when its inputs came from --calib).
    reloadable = isinstance(model, (str, Path)) and not loaded.example_from_calib
    phases = {"load": time.perf_counter() - started}
    # The Program now holds the weights (sharing the loader's tensors): drop the eager module, or every
    # weight a pass replaces would stay alive through it — a second copy of the model during the passes.
    loaded.module = None
    data = load_model_data(loaded.info, options)
    if loaded.example_from_calib:
        data.notes["example inputs"] = "the first 2 calibration samples (the model came without inputs)"
    with staging_folder(out if distributed.is_main() else None) as staging:  # only rank 0 writes
        ctx = PassContext(
            calib=data.calib,
            seed=options.seed,
            threads=options.threads,
            backend=resolve_backend_name(options.backend),
            progress=options.progress and distributed.is_main(),
            instruments=_instruments(options),
            eval_tokens=data.eval,
            tokenizer=data.tokenizer,
            artifact_dir=staging,
        )
        torch.manual_seed(options.seed)
        mark = time.perf_counter()
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
            data=dict(data.notes),
            phase_seconds=phases,
        )
        phases["passes"] = time.perf_counter() - mark
        artifacts: dict[str, Path] = {}
        if not _reads_original_after_passes(options, reloadable):
            # Nothing compares against the original any more (the bench re-loads it from its source):
            # release it so that lowering does not run with two copies of the model in memory. After an
            # in-place pipeline this name held the transformed Program, which is no original either.
            program = ctx.reference = None
        release_freed_memory(collect_cycles=True)  # the passes' garbage must not sit under the lowering
        if staging is not None and out is not None and manager.variants:
            folders = artifacts_module.write_variants(program, manager, pass_reports, loaded, data, options,
                                                      report, staging)  # fmt: skip
            report.seconds = time.perf_counter() - started
            report.write(staging)
            replace_output(staging, out)
            artifacts = {name: out / folder for name, folder in folders.items()}
        elif staging is not None and out is not None:
            mark = time.perf_counter()
            lowered = artifacts_module.lower_and_verify(program, transformed, loaded, data, options, report,
                                                        staging)  # fmt: skip
            phases["lower_verify"] = time.perf_counter() - mark
            if not options.keep_program:
                transformed = None  # written and verified: the bench needs only the files
            mark = time.perf_counter()
            report.latency = bench_latency(program, staging, loaded, options)
            phases["bench"] = time.perf_counter() - mark
            report.seconds = time.perf_counter() - started
            report.write(staging)
            replace_output(staging, out)
            artifacts = {name: out / rel for name, rel in lowered.items()}
    report.seconds = time.perf_counter() - started
    out = out if distributed.is_main() else None
    return CompileResult(
        program=transformed, report=report, artifacts=artifacts, output_dir=out, variants=manager.variants
    )


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
        any(p.needs_original for p in pipeline.passes),  # e.g. a distillation teacher (ctx.reference)
    )
    return any(uses)


def _replay_pipeline(pipeline: Pipeline, path: str) -> Pipeline:
    """The pipeline of an earlier run (unless one is given) with its replaying pass pointed at ``path``.

    The pass declares which Config field takes the report (``Pass.replay_option``).
    """
    try:
        recorded = json.loads(Path(path).expanduser().read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read replay report {path}: {err}") from None
    if not pipeline.passes:
        pipeline = parse_pipeline(recorded.get("pipeline", ""))
    replaying = [p for p in pipeline.passes if p.replay_option]
    if not replaying:
        able = [n for n in all_pass_names() if get_pass_class(n).replay_option]
        raise UserError(
            f"--replay needs a pass that replays recorded decisions in the pipeline: {', '.join(able)}"
        )
    first = replaying[0]
    first.config = replace(first.config, **{first.replay_option: str(Path(path).expanduser().resolve())})
    return pipeline
