"""Writing compile outputs: one engine folder (lower, manifest, load back, verify, measure) or, after a
fan-out pass, one folder per variant plus the table the fanning pass fills in.

Example:
    >>> # artifacts = lower_and_verify(original, program, loaded, data, options, report, staging)
    >>> # folders = write_variants(original, manager, pass_reports, loaded, data, options, report, staging)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmopt.data.quality import ModelData, evaluate_quality
from slmopt.lowering import MANIFEST, get_backend
from slmopt.memory import release_freed_memory
from slmopt.report import CompileReport
from slmopt.verification import bench_latency, parity

if TYPE_CHECKING:
    from slmopt.api import CompileOptions
    from slmopt.loaders import LoadedModel
    from slmopt.pipeline.manager import PassManager
    from slmopt.program import Program

__all__ = ["VARIANT_PREFIX", "lower_and_verify", "write_variants"]

VARIANT_PREFIX = "subnet-"  # each fan-out variant is written to <out>/subnet-<name>/


def lower_and_verify(
    original: Program | None,
    program: Program,
    loaded: LoadedModel,
    data: ModelData,
    options: CompileOptions,
    report: CompileReport,
    folder: Path,
) -> dict[str, str]:
    """Lowers into ``folder``, loads the engine back, checks parity and the artifacts, measures quality.

    The artifact checks are the backend's own (:meth:`slmopt.lowering.Backend.check_artifacts`): it reads
    back what it wrote and checks what the passes promised in ``program.lowering_hints``.

    Returns:
        Artifact name -> file name inside ``folder``.
    """
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
    report.checks = backend.check_artifacts(program, folder, dict(lowered.artifacts))
    if data.eval is not None:
        report.quality = evaluate_quality(original, engine, data, progress=options.progress)
    return dict(lowered.artifacts)


def write_variants(
    original: Program | None,
    manager: PassManager,
    pass_reports: list[Any],
    loaded: LoadedModel,
    data: ModelData,
    options: CompileOptions,
    report: CompileReport,
    staging: Path,
) -> dict[str, str]:
    """Lowers every fan-out variant into ``staging/subnet-<name>/`` and fills the top-level table.

    The pass that fanned out writes the table rows and summaries (:meth:`Pass.variant_row`,
    :meth:`Pass.write_variant_summary`); its report is the last of ``pass_reports``.

    Returns:
        Variant name -> folder name inside ``staging``.
    """
    fanned, fan_report = manager.fanned_out, pass_reports[-1]
    assert fanned is not None, "write_variants needs a pipeline that fanned out"
    folders = {}
    for name, (program, reports) in manager.variants.items():
        folder = staging / f"{VARIANT_PREFIX}{name}"
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
        lower_and_verify(original, program, loaded, data, options, sub, folder)
        sub.latency = bench_latency(original, folder, loaded, options)
        sub.write(folder)
        report.subnets.append(fanned.variant_row(name, folder, sub, fan_report.metrics, options))
        if sub.quality and not report.quality:  # the original model's held-out quality, once
            report.quality = {"before": sub.quality["before"], "after": {}}
        folders[name] = folder.name
    report.artifacts = fanned.write_variant_summary(report.subnets, staging)
    return folders
