"""Peak/current RSS of one ``slmopt.compile`` call, stage by stage (load, passes, lowering, ORT load, parity).

Usage::

    python benchmarks/memory_stages.py                                   # GPT-2-small shape, empty pipeline
    python benchmarks/memory_stages.py --passes "mask-2to4{method=magnitude}" \\
        --backend-option external_data=true --backend-option generation=false

Wraps the compile stages of :mod:`slmopt.api` (and each pass) in this process and prints ``VmHWM`` (peak)
and ``VmRSS`` (current, split into anonymous and file-backed pages: memory-mapped weights count as the
latter) in GB before and after each, to show where copies of the weights are held. The model is saved by
a child process first so this process's peak is the compile's alone.
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main"]


def _status_gb() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value
    return {key: int(fields[key].split()[0]) / 1e6 for key in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}


def mark(tag: str) -> None:
    gb = _status_gb()
    print(
        f"[{time.strftime('%X')}] {tag:<28} peak {gb['VmHWM']:5.2f} GB   now {gb['VmRSS']:5.2f} GB "
        f"(anon {gb['RssAnon']:4.2f}, file-backed {gb['RssFile']:4.2f})",
        flush=True,
    )


def _wrap(owner: Any, name: str, label: str | None = None) -> None:
    real = getattr(owner, name)
    label = label or name

    @functools.wraps(real)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        mark(f"> {label}")
        result = real(*args, **kwargs)
        mark(f"< {label}")
        return result

    setattr(owner, name, wrapper)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=12, help="GPT-2 layers (12 = GPT2Config defaults)")
    parser.add_argument("--passes", default="", help="pipeline (default: empty)")
    parser.add_argument("--backend-option", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    mark("start")
    import slmopt.api as api
    import slmopt.artifacts as artifacts
    import slmopt.pipeline.parse as pipeline_module
    import slmopt.pipeline.pass_base as pass_base
    from slmopt.cli import _key_values
    from slmopt.pipeline.manager import PassManager

    mark("imports")
    with tempfile.TemporaryDirectory(prefix="slmopt-stages-") as tmp:
        model, calib = Path(tmp) / "model", Path(tmp) / "calib.npy"
        build = (
            "import torch, transformers; torch.manual_seed(0); "
            f"transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer={args.layers}))"
            f".save_pretrained({str(model)!r})"
        )
        subprocess.run([sys.executable, "-c", build], check=True, capture_output=True)
        np.save(calib, np.random.default_rng(0).integers(0, 50257, size=(16, 128)))
        for name in ("load_program", "load_model_data", "replace_output"):
            _wrap(api, name)
        for name in ("lower_and_verify", "parity"):
            _wrap(artifacts, name)
        _wrap(PassManager, "run")
        real_pass_class = pass_base.get_pass_class

        def get_pass_class(name: str) -> Any:
            cls = real_pass_class(name)
            if "call" in vars(cls) and not hasattr(cls.call, "__wrapped__"):
                _wrap(cls, "call", f"pass {name}")  # one mark before and after each pass
            return cls

        pass_base.get_pass_class = get_pass_class
        pipeline_module.get_pass_class = get_pass_class
        real_get = api.get_backend

        def get_backend(name: str) -> Any:
            backend = real_get(name)
            _wrap(backend, "lower")
            _wrap(backend, "load")
            _wrap(backend, "check_artifacts")  # what artifact_checks measured before the backend owned it
            return backend

        api.get_backend = get_backend
        artifacts.get_backend = get_backend  # lower_and_verify looks the backend up there
        api.compile(str(model), args.passes, output_dir=Path(tmp) / "out", calib=str(calib), seq_len=128,
                    num_samples=16, bench=False, progress=False, threads=1,
                    backend_options=_key_values(args.backend_option))  # fmt: skip
    mark("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
