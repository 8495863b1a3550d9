"""Train tinylm, slmopt's reference model: a ~1.7M-parameter byte-level Llama on the stdlib's source.

A stock ``transformers.LlamaForCausalLM`` (GQA, SwiGLU, RMSNorm, RoPE) with one token per byte, trained
in minutes on a CPU with no download, so every slmopt pass and backend runs on a real trained network.
Files are split into train / held-out by a hash of their relative path (the same split on every machine
with the same Python). See README.md next to this file for the outputs and measured quality.

Usage::

    python examples/tinylm/train.py --out ~/.cache/slmopt/tinylm [--minutes 5] [--seed 0] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from slmopt.data.metrics import cross_entropy_nats, summarize_quality
from slmopt.data.windows import eval_windows

__all__ = ["TrainConfig", "build_tokenizer", "model_config", "load_corpus", "train", "main"]

logger = logging.getLogger(__name__)

# Directories of the stdlib that are not library source: tests (large, repetitive, odd encodings),
# third-party packages, and build/platform artefacts that differ between machines.
SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib-dynload"}
)
SKIP_PREFIXES = ("config-", "_sysconfigdata")
HELDOUT_PERCENT = 5
OUTPUT_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "calib.txt",
    "heldout.txt",
    "tinylm.json",
)


@dataclass
class TrainConfig:
    """Everything one training run depends on (the CLI fills it; tests shrink it).

    Attributes:
        out: Output model directory.
        minutes: Wall-clock budget of the optimisation loop (ignored when ``steps`` is set).
        steps: Fixed number of steps instead of a time budget (bit-for-bit reproducible runs).
        seed: Seed of initialisation and batch sampling.
        tiny: Use a very small model (tests).
        batch_size: Windows per step.
        seq_len: Training window length; also the evaluation window length.
        lr: Peak learning rate (cosine decay to ``lr * min_lr_ratio`` after ``warmup_steps``).
        force: Replace an existing output directory.
        corpus_root: Directory to take ``.py`` files from (default: the stdlib).
        calib_bytes / heldout_bytes: Size of ``calib.txt`` / ``heldout.txt``.
        progress: Show tqdm progress bars.
        threads: Torch intra-op threads (default: the cores this process may use).
    """

    out: Path
    minutes: float = 5.0
    steps: int | None = None
    seed: int = 0
    tiny: bool = False
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    weight_decay: float = 0.1
    force: bool = False
    corpus_root: Path | None = None
    calib_bytes: int = 256 * 1024
    heldout_bytes: int = 256 * 1024
    progress: bool = True
    threads: int | None = None


@dataclass
class Corpus:
    """Train and held-out bytes plus file counts for the metadata."""

    train: bytes
    heldout: bytes
    counts: dict[str, int] = field(default_factory=dict)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character table (256 distinct characters).

    Example:
        >>> table = bytes_to_unicode(); table[ord("a")], table[ord(" ")]
        ('a', 'Ġ')
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def build_tokenizer(model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """A Hugging Face tokenizer whose token id is the byte value: ``ids == list(text.encode())``.

    A byte-level BPE with no merges: the ByteLevel pre-tokenizer maps each byte to its GPT-2 character
    (no regex split, no prefix space) and the vocabulary maps that character back to the byte value.

    Example:
        >>> build_tokenizer()("hé", add_special_tokens=False)["input_ids"]
        [104, 195, 169]
    """
    table = bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    # No special tokens: all 256 ids are bytes, and an extra id would not fit the embedding.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, clean_up_tokenization_spaces=False, model_max_length=model_max_length
    )


def model_config(tiny: bool = False) -> LlamaConfig:
    """The tinylm architecture (``tiny=True``: a toy size for tests).

    Example:
        >>> model_config().num_key_value_heads
        2
    """
    dims = (
        {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
        if tiny
        else {"hidden_size": 192, "num_hidden_layers": 4, "num_attention_heads": 6, "intermediate_size": 512}
    )
    return LlamaConfig(
        vocab_size=256,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        # Bytes 0x01/0x02 are not BOS/EOS here; generation runs until max_new_tokens.
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        **dims,
    )


def stdlib_files(root: Path) -> list[Path]:
    """Sorted relative paths of the ``.py`` files under ``root``, minus tests and platform files.

    Example:
        >>> any(p.name == "argparse.py" for p in stdlib_files(Path(sysconfig.get_paths()["stdlib"])))
        True
    """
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place stops os.walk from descending; sorting makes the walk order irrelevant.
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith(SKIP_PREFIXES))
        for name in filenames:
            if name.endswith(".py") and not name.startswith(SKIP_PREFIXES):
                found.append((Path(dirpath) / name).relative_to(root))
    return sorted(found, key=lambda p: p.as_posix())


def is_heldout(rel_path: Path) -> bool:
    """Whether a file belongs to the held-out split: a hash of its relative POSIX path, ~5 % of files.

    Example:
        >>> is_heldout(Path("argparse.py")) == is_heldout(Path("argparse.py"))
        True
    """
    digest = hashlib.sha256(rel_path.as_posix().encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELDOUT_PERCENT


def load_corpus(root: Path) -> Corpus:
    """Concatenate the train and held-out files (UTF-8 only, in sorted order)."""
    train, heldout = [], []
    counts = {"files": 0, "train_files": 0, "heldout_files": 0, "skipped_files": 0}
    for rel in stdlib_files(root):
        counts["files"] += 1
        data = (root / rel).read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            data = b""
        # Non-UTF-8 (and empty) files are skipped so calib/heldout text is always valid UTF-8.
        if not data or b"\x00" in data:
            counts["skipped_files"] += 1
            continue
        data = data if data.endswith(b"\n") else data + b"\n"
        (heldout if is_heldout(rel) else train).append(data)
        counts["heldout_files" if is_heldout(rel) else "train_files"] += 1
    if not train or not heldout:
        raise ValueError(f"corpus {root} needs train and held-out files, found {counts}")
    return Corpus(train=b"".join(train), heldout=b"".join(heldout), counts=counts)


def spread_slice(data: bytes, total: int, pieces: int = 16) -> str:
    """About ``total`` bytes of ``data`` taken as ``pieces`` evenly spaced runs of whole lines.

    Cutting at newlines keeps every piece valid UTF-8 (``\\n`` never occurs inside a multi-byte
    character), and spreading the pieces samples many files instead of the alphabetically first few.

    Example:
        >>> spread_slice(b"a\\nb\\nc\\nd\\n", 4, pieces=2)
        'a\\nd\\n'
    """
    if len(data) <= total:
        return data.decode("utf-8")
    chunk = total // pieces
    out = []
    for i in range(pieces):
        start = i * (len(data) - chunk) // max(pieces - 1, 1)
        if start > 0:  # move forward to the start of a line
            newline = data.find(b"\n", start - 1)
            if newline < 0:
                break
            start = newline + 1
        end = data.rfind(b"\n", start, start + chunk) + 1
        if end > start:
            out.append(data[start:end])
    return b"".join(out).decode("utf-8")


def _save_tokenizer(path: Path, model_max_length: int) -> None:
    build_tokenizer(model_max_length).save_pretrained(path)
    # transformers 5 writes its own class name ("TokenizersBackend"), unknown to 4.x; the generic
    # fast-tokenizer class loads tokenizer.json in both.
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def is_complete(out: Path) -> bool:
    """Whether ``out`` holds a finished tinylm (every output file present)."""
    return all((out / name).is_file() for name in OUTPUT_FILES)


def _lr(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up, then cosine decay over the run's progress (time or steps) in [0, 1]."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    cos = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cos)


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # Weight decay on matrices only: decaying norm gains pulls them towards zero for no benefit.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def _optimise(model: LlamaForCausalLM, train_ids: torch.Tensor, cfg: TrainConfig) -> dict[str, float]:
    """The training loop; returns step count, seconds, tokens seen and first/last losses."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = _optimizer(model, cfg)
    budget = cfg.minutes * 60.0
    bar = tqdm(
        total=cfg.steps if cfg.steps else round(budget),
        unit="step" if cfg.steps else "s",
        desc="train",
        disable=not cfg.progress,
    )
    losses: list[float] = []
    step, t0, shown = 0, time.perf_counter(), 0
    model.train()
    while True:
        elapsed = time.perf_counter() - t0
        progress = step / cfg.steps if cfg.steps else elapsed / budget
        if progress >= 1.0:
            break
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, step, progress)
        starts = torch.randint(0, len(train_ids) - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
        batch = torch.stack([train_ids[s : s + cfg.seq_len + 1] for s in starts.tolist()]).long()
        # bf16 autocast roughly doubles CPU throughput (AVX512-BF16); weights and AdamW stay fp32.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if cfg.steps:
            bar.update(1)
        else:
            now = min(round(time.perf_counter() - t0), bar.total)
            bar.update(now - shown)
            shown = now
        bar.set_postfix(step=step, loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", refresh=False)
    bar.close()
    window = max(1, min(20, len(losses) // 4))
    return {
        "steps": step,
        "seconds": round(time.perf_counter() - t0, 2),
        "tokens_seen": step * cfg.batch_size * cfg.seq_len,
        "first_loss": sum(losses[:window]) / window,
        "last_loss": sum(losses[-window:]) / window,
    }


def _bits_per_byte(model: LlamaForCausalLM, path: Path, seq_len: int, progress: bool) -> dict[str, float]:
    """Evaluate exactly as ``slmopt`` does: contiguous byte windows, fp32, next-token NLL."""
    data = eval_windows(path, seq_len=seq_len, byte_level=True, vocab_size=256)
    model.eval()
    nats = cross_entropy_nats(
        lambda ids: model(input_ids=ids).logits, data.tokens, batch_size=16, progress=progress
    )
    quality = summarize_quality(nats, data.tokens.shape[0] * (seq_len - 1), byte_level=True)
    return {"nats_per_byte": round(nats, 5), "bits_per_byte": round(quality["bits_per_byte"], 5)}


def _chmod_like_umask(path: Path, mode: int) -> None:
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(mode & ~umask)


def _install(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` into place; an existing ``out`` (``--force``) is swapped out first."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def train(cfg: TrainConfig) -> dict:
    """Train tinylm into ``cfg.out`` and return its metadata (also written to ``tinylm.json``).

    Args:
        cfg: Run settings.

    Returns:
        The metadata dict; ``{"cached": True, ...}`` if ``cfg.out`` already held a finished model.

    Raises:
        FileExistsError: ``cfg.out`` exists, is not a finished tinylm, and ``cfg.force`` is false.

    Example:
        >>> meta = train(TrainConfig(out=Path("/tmp/tinylm"), minutes=5))  # doctest: +SKIP
        >>> meta["heldout"]["bits_per_byte"]  # doctest: +SKIP
        1.9
    """
    out = Path(cfg.out).expanduser().resolve()
    if out.exists() and not cfg.force:
        if is_complete(out):
            return {"cached": True, **json.loads((out / "tinylm.json").read_text())}
        if any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not a finished tinylm; pass --force to replace it")
    threads = cfg.threads or (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train_and_save(cfg, out, threads)
    finally:
        torch.set_num_threads(previous)  # callers (tests, notebooks) keep their own setting


def _train_and_save(cfg: TrainConfig, out: Path, threads: int) -> dict:
    torch.manual_seed(cfg.seed)
    root = Path(cfg.corpus_root or sysconfig.get_paths()["stdlib"])
    corpus = load_corpus(root)
    train_ids = torch.frombuffer(bytearray(corpus.train), dtype=torch.uint8)
    model = LlamaForCausalLM(model_config(cfg.tiny))
    params = sum(p.numel() for p in model.parameters())
    logger.info("tinylm: %d params, %d train bytes, %s", params, len(corpus.train), corpus.counts)
    run = _optimise(model, train_ids, cfg)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _chmod_like_umask(tmp, 0o777)  # mkdtemp makes 0700; the model dir should be shareable
        model.save_pretrained(tmp, safe_serialization=True)
        _save_tokenizer(tmp, model.config.max_position_embeddings)
        (tmp / "calib.txt").write_text(spread_slice(corpus.train, cfg.calib_bytes), encoding="utf-8")
        (tmp / "heldout.txt").write_text(spread_slice(corpus.heldout, cfg.heldout_bytes), encoding="utf-8")
        meta = {
            "model": "tinylm",
            "architecture": "LlamaForCausalLM",
            "params": params,
            "seed": cfg.seed,
            **run,
            "threads": threads,
            "train": _bits_per_byte(model, tmp / "calib.txt", cfg.seq_len, cfg.progress),
            "heldout": _bits_per_byte(model, tmp / "heldout.txt", cfg.seq_len, cfg.progress),
            "eval": f"contiguous {cfg.seq_len}-byte windows, next-token NLL on positions 1..{cfg.seq_len - 1}",
            "corpus": {
                "root": str(root),
                **corpus.counts,
                "train_bytes": len(corpus.train),
                "heldout_bytes": len(corpus.heldout),
                "heldout_percent": HELDOUT_PERCENT,
            },
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "config": {k: v for k, v in asdict(cfg).items() if k not in ("out", "corpus_root")},
        }
        (tmp / "tinylm.json").write_text(json.dumps(meta, indent=2) + "\n")
        for f in tmp.iterdir():
            _chmod_like_umask(f, 0o666)
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="output model directory")
    p.add_argument("--minutes", type=float, default=5.0, help="training wall-clock budget (default 5)")
    p.add_argument("--steps", type=int, default=None, help="train a fixed number of steps instead")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--tiny", action="store_true", help="toy model size, for tests")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.minutes <= 0 or (a.steps is not None and a.steps < 1):
        p.error("--minutes must be > 0 and --steps >= 1")
    options = {k: getattr(a, k) for k in ("out", "minutes", "steps", "seed", "tiny", "force", "threads")}
    cfg = TrainConfig(**options, progress=not a.no_progress)
    try:
        meta = train(cfg)
    except (FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    held = f"held-out {meta['heldout']['bits_per_byte']} bits/byte"
    if meta.get("cached"):
        print(f"already trained: {a.out} ({held})")
    else:
        print(
            f"saved {a.out}: {meta['params']:,} params, {meta['steps']} steps in {meta['seconds']} s, {held}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
