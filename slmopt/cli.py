"""The ``slmopt`` command line.

Example:
    $ slmopt inspect path/to/model
    $ slmopt list-passes
    $ slmopt compile path/to/model --passes "mask-2to4{method=sparsegpt}" --calib calib.txt \\
          --eval heldout.txt -o out/
    $ slmopt eval out/ --data heldout.txt
    $ slmopt bench path/to/model out/
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from slmopt.errors import DistributedError, PassError, UserError

__all__ = ["main"]

log = logging.getLogger("slmopt")

EPILOG = """\
examples:
  slmopt inspect ~/.cache/slmopt/tinylm
  slmopt compile ~/.cache/slmopt/tinylm --passes "mask-2to4{method=sparsegpt}" \\
      --calib calib.txt --eval heldout.txt -o out/
  slmopt eval out/ --data heldout.txt
  slmopt bench ~/.cache/slmopt/tinylm out/

MODEL is a Hugging Face model folder (config.json + safetensors), a torch.export .pt2 file, or
package.module:factory (a function returning a module, or (module, example_inputs)).
Pipelines are MLIR-style: "name{key=value,...},name2" — see `slmopt list-passes`.
Exit codes: 0 ok, 1 internal failure, 2 bad input (one line on stderr; --debug shows the traceback).
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and ONNX Runtime")


def _key_values(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--backend-option expects key=value, got {item!r}")
        lowered = value.lower()
        out[key] = (
            lowered == "true" if lowered in ("true", "false") else int(value) if value.isdigit() else value
        )
    return out


# ------------------------------------------------------------------------------------------ commands
def cmd_inspect(args: argparse.Namespace) -> int:
    from slmopt.analysis import analyze
    from slmopt.loaders import load_program

    program, _ = load_program(args.model)
    structure = analyze(program)
    if args.json:
        print(json.dumps(structure.to_dict(), indent=2, default=str))
    else:
        print(f"model: {args.model} ({program.info.kind}, {program.num_params():,} parameters)")
        print(structure.summary())
    return 0


def _describe_type(tp: Any) -> str:
    from slmopt.pipeline.options import describe_type as describe

    return describe(tp)


def cmd_list_passes(args: argparse.Namespace) -> int:
    from slmopt.pipeline.pass_base import all_pass_names, config_fields, get_pass_class

    listing = []
    for name in all_pass_names():
        cls = get_pass_class(name)
        hints = typing.get_type_hints(cls.Config)
        options = [
            {"name": f, "type": _describe_type(hints[f]), "default": d, "help": h}
            for f, _, d, h in config_fields(cls.Config)
        ]
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        listing.append({"name": name, "aliases": list(cls.aliases), "summary": doc, "options": options})
    if args.json:
        print(json.dumps(listing, indent=2, default=str))
        return 0
    from slmopt.pipeline.options import format_value

    for entry in listing:
        aliases = f" (aliases: {', '.join(entry['aliases'])})" if entry["aliases"] else ""
        print(f"{entry['name']}{aliases}\n    {entry['summary']}")
        width = (
            max((len(o["name"]) + len(format_value(o["default"])) for o in entry["options"]), default=0) + 1
        )
        for opt in entry["options"]:
            setting = f"{opt['name']}={format_value(opt['default'])}"
            print(f"    {setting:<{width}}  [{opt['type']}] {opt['help']}")
        print()
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from slmopt.api import compile as compile_model

    result = compile_model(
        args.model,
        args.passes,
        output_dir=args.output,
        backend=args.backend,
        force=args.force,
        calib=args.calib,
        eval=args.eval,
        seq_len=args.seq_len,
        num_samples=args.num_samples,
        eval_samples=args.eval_samples,
        seed=args.seed,
        threads=args.threads,
        dump_graph=args.dump_graph,
        time_passes=args.time_passes,
        verify_each=args.verify_each,
        bench=not args.no_bench,
        keep_program=False,  # only the written files are used below
        progress=not args.no_progress,
        backend_options=_key_values(args.backend_option),
        distributed=args.distributed or None,
        replay=args.replay,
    )
    if result.output_dir is None and _env_rank() > 0:
        return 0  # a non-zero rank of a distributed run: rank 0 prints the report and writes the output
    if not args.quiet:
        print(result.report.to_markdown())
    if result.output_dir is not None:
        print(f"wrote {result.output_dir}", file=sys.stderr)
    return 0


def _engine_or_program(target: str, threads: int | None) -> tuple[Callable, Any]:
    """An output folder loads its engine; anything else is loaded and captured as a model."""
    from slmopt.lowering import MANIFEST, load_engine

    path = Path(target)
    if path.is_dir() and (path / MANIFEST).is_file():
        from slmopt.program import ModelInfo

        try:
            manifest = json.loads((path / MANIFEST).read_text())
            info = ModelInfo(**manifest["model"])
            return load_engine(path, threads=threads), info
        except (UserError, ImportError):
            raise
        except Exception as err:  # noqa: BLE001 - a damaged folder fails in many ways; say which folder
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise UserError(
                f"{path} is not a usable slmopt output folder ({type(err).__name__}: {first}); recompile it"
            ) from err
    from slmopt.loaders import load_program

    program, _ = load_program(target)
    return program, program.info


def cmd_eval(args: argparse.Namespace) -> int:
    from slmopt.api import CompileOptions
    from slmopt.data.quality import load_model_data, quality_of

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    runner, info = _engine_or_program(args.target, args.threads)
    options = CompileOptions(eval=args.data, seq_len=args.seq_len, eval_samples=args.samples)
    data = load_model_data(info, options)
    quality = quality_of(runner, data, progress=not args.no_progress)
    quality["eval_windows"] = int(data.eval.tokens.shape[0])
    print(json.dumps(quality, indent=2))
    return 0


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"{flag} expects comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"{flag} expects positive integers, got {text!r}")
    return values


def cmd_bench_generation(args: argparse.Namespace) -> int:
    from slmopt.generation.bench import bench_generation

    result = bench_generation(
        args.model,
        args.compiled,
        threads=args.threads or 1,
        prompt_lengths=_int_list(args.prompt_lengths, "--prompt-lengths"),
        batches=_int_list(args.decode_batches, "--decode-batches"),
        context=args.context,
        reps=args.reps,
        progress=not args.no_progress,
    )
    return _print_bench(result, args.json)


def _print_bench(result: Any, json_path: str | None) -> int:
    """Prints a benchmark's table (and writes its JSON when asked): the tail of both bench modes."""
    if json_path:
        Path(json_path).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    print(result.table())
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from slmopt.bench import bench_model_vs_compiled

    if args.generation:
        return cmd_bench_generation(args)

    result = bench_model_vs_compiled(
        args.model,
        args.compiled,
        threads=args.threads or 1,
        batch=args.batch,
        seq=args.seq,
        reps=args.reps,
        progress=not args.no_progress,
    )
    return _print_bench(result, args.json)


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise UserError(f"--input-ids expects comma-separated integers like 5,17,42, got {text!r}") from None
    if not ids:
        raise UserError("--input-ids is empty: give at least one token id")
    return ids


def cmd_generate(args: argparse.Namespace) -> int:
    from slmopt.generation.generate import Generator, Sampling
    from slmopt.lowering import MANIFEST

    if args.prompt is not None and not args.prompt:
        raise UserError("the prompt is empty: give at least one character")
    knobs = (args.temperature, args.top_k, args.top_p)
    sampling = Sampling(
        do_sample=any(k is not None for k in knobs),
        temperature=1.0 if args.temperature is None else args.temperature,
        top_k=args.top_k or 0,
        top_p=1.0 if args.top_p is None else args.top_p,
        seed=args.seed,
    )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    target = Path(args.engine)
    if target.is_dir() and (target / MANIFEST).is_file():
        gen = Generator.from_engine(target, threads=args.threads)
    else:
        gen = Generator.from_model(args.engine)
    ids = _parse_ids(args.input_ids) if args.input_ids is not None else gen.encode(args.prompt)
    if args.print_ids or gen.tokenizer is None:
        out = gen.generate(ids, args.max_new_tokens, sampling)[0, len(ids) :].tolist()
        print(",".join(str(i) for i in out))
        return 0
    if args.no_stream:
        out = gen.generate(ids, args.max_new_tokens, sampling)[0, len(ids) :].tolist()
        print(gen.decode(out))
        return 0
    new: list[int] = []
    printed = ""
    for token in gen.stream(ids, args.max_new_tokens, sampling):
        new.append(int(token[0]))
        text = gen.decode(new)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[len(printed) :], end="", flush=True)
            printed = text
    print(gen.decode(new)[len(printed) :])
    return 0


# ------------------------------------------------------------------------------------------ parser
class _Parser(argparse.ArgumentParser):
    """Usage mistakes print one ``slmopt: error:`` line (exit 2) like every other bad input."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"slmopt: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="slmopt",
        description="Compile trained language models into small, fast deployable engines.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("inspect", help="print the structure slmopt finds in a model")
    p.add_argument("model", help="model folder, .pt2 file or package.module:factory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_common(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("list-passes", help="list every pass, its aliases and options")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_common(p)
    p.set_defaults(func=cmd_list_passes)

    p = sub.add_parser(
        "compile",
        help="run a pass pipeline and lower the result to an engine",
        description="Capture MODEL, rewrite it with --passes, lower it to --backend in -o OUTPUT "
        "(written atomically), verify parity, and report quality/latency before and after.",
    )
    p.add_argument("model", help="model folder, .pt2 file or package.module:factory")
    p.add_argument("--passes", default="", help='pipeline, e.g. "mask-2to4{method=sparsegpt}"')
    p.add_argument("-o", "--output", required=True, help="output folder (refused if it exists, see --force)")
    p.add_argument("--backend", default="onnxruntime", help="onnxruntime (default), torch or tensorrt")
    p.add_argument("--backend-option", action="append", default=[], metavar="KEY=VALUE",
                   help="backend option, e.g. external_data=true (repeatable)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--calib", help="calibration data: text file, or token ids / inputs as .npy/.pt")
    p.add_argument("--eval", help="held-out text (or .npy/.pt ids) to report quality before/after")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per calibration/eval window (default: 256 for text and 1-D id streams; "
                   "rows of a 2-D .npy/.pt id array are used as given)")  # fmt: skip
    p.add_argument("--num-samples", type=int, default=64, help="calibration windows (64)")
    p.add_argument("--eval-samples", type=int, default=64, help="max eval windows (64)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling and every random choice (0)")
    p.add_argument("--dump-graph", metavar="DIR", help="write each pass's input/output graph to DIR")
    p.add_argument("--time-passes", action="store_true", help="log a table of pass times")
    p.add_argument("--verify-each", action="store_true", help="record max |diff| before/after each pass")
    p.add_argument("--no-bench", action="store_true", help="skip the before/after latency measurement")
    p.add_argument("--replay", metavar="REPORT",
                   help="report.json of an earlier elastic compile: rebuild its subnets with the recorded "
                   "orders and plans, without re-scoring (the pipeline defaults to the recorded one)")  # fmt: skip
    p.add_argument("--distributed", action="store_true",
                   help="share calibration/distillation among the processes torchrun started (automatic "
                   "when WORLD_SIZE > 1; gloo on CPU, NCCL on GPU); rank 0 writes -o. See "
                   "docs/DISTRIBUTED.md")  # fmt: skip
    _add_common(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("eval", help="held-out perplexity / bits per byte of an engine or a model")
    p.add_argument("target", help="an slmopt output folder, or a model")
    p.add_argument("--data", required=True, help="held-out text (or .npy/.pt token ids)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per window (default: 256; rows of a 2-D id array as given)")  # fmt: skip
    p.add_argument("--samples", type=int, default=64, help="max windows (64)")
    _add_common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="latency of the original model vs a compiled engine, side by side")
    p.add_argument("model", help="the original model")
    p.add_argument("compiled", help="an slmopt output folder")
    p.add_argument("--batch", type=int, default=1, help="batch size (1)")
    p.add_argument("--seq", type=int, default=128, help="sequence length (128)")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions per engine (20)")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    p.add_argument("--generation", action="store_true",
                   help="instead: prefill tokens/s, decode ms/token and KV bytes/token (needs decoder.onnx)")  # fmt: skip
    p.add_argument("--prompt-lengths", default="128,512,2048", help="--generation: prefill lengths")
    p.add_argument("--decode-batches", default="1,8", help="--generation: decode batch sizes (1,8)")
    p.add_argument("--context", type=int, default=128, help="--generation: cached positions in decode (128)")
    _add_common(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "generate",
        help="generate text (or token ids) with an engine's KV-cache decoder",
        description="Prefill the prompt, then decode one token at a time with the KV cache. ENGINE is an "
        "slmopt output folder with decoder.onnx (onnxruntime backend, causal LM), or a model (captured, "
        "given a KV cache and run in torch, for comparison). Greedy unless a sampling flag is given.",
        epilog="examples:\n  slmopt generate out/ --prompt 'def main(' --max-new-tokens 64\n"
        "  slmopt generate out/ --input-ids 5,17,42 --print-ids --max-new-tokens 8 --top-k 20 --seed 1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("engine", help="slmopt output folder (with decoder.onnx) or a model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (encoded with the tokenizer saved with the model)")
    src.add_argument("--input-ids", metavar="IDS", help="prompt as comma-separated token ids, e.g. 5,17,42")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (32)")
    p.add_argument("--print-ids", action="store_true", help="print generated token ids, not text")
    p.add_argument("--temperature", type=float, help="sample with this temperature (> 0)")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, help="sample from the smallest set with this probability mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (0): same seed, same tokens")
    p.add_argument("--no-stream", action="store_true", help="print the text once at the end")
    _add_common(p)
    p.set_defaults(func=cmd_generate)
    return parser


def _env_rank() -> int:
    """torchrun's ``RANK`` of this process (0 when not launched by it): only rank 0 logs and prints."""
    return int(os.environ.get("RANK", "0") or 0)


def _on_sigterm(signum: int, frame: Any) -> None:
    # SystemExit unwinds through the atomic-write cleanup, so no half-written output folder remains.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = (
        logging.DEBUG if args.debug else logging.WARNING if args.quiet or _env_rank() > 0 else logging.INFO
    )
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not args.debug:
        import torch  # noqa: F401 - torch configures its loggers on import; quiet them afterwards

        for noisy in ("torch", "onnxscript", "onnx_ir", "transformers", "torch.onnx",
                      "torch.onnx._internal.exporter._registration"):  # fmt: skip
            logging.getLogger(noisy).setLevel(logging.ERROR)
        import warnings

        warnings.filterwarnings("ignore")
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.func(args)
    except (UserError, ValueError, FileNotFoundError, ImportError) as err:
        if args.debug:
            raise
        print(f"slmopt: error: {err}", file=sys.stderr)
        return 2
    except PassError as err:
        if args.debug:
            raise
        print(f"slmopt: error: {err} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    except DistributedError as err:
        if args.debug:
            raise
        print(f"slmopt: error: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # Output piped into `head` and closed early: not an error worth a message.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("slmopt: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one line for users, the traceback with --debug
        if args.debug:
            raise
        print(f"slmopt: internal error: {type(err).__name__}: {err} (run with --debug)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
