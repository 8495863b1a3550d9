"""Tests for examples/tinylm/train.py: tokenizer, corpus split, atomic output, a few seconds of training."""

from __future__ import annotations

import importlib.util
import json
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

from slmopt.data.windows import eval_windows

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "tinylm" / "train.py"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tinylm_train", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look the module up in sys.modules while the class body is processed.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


tl = _load_script()


@pytest.fixture(scope="module")
def saved_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tl.build_tokenizer().save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def test_bytes_to_unicode_is_a_bijection() -> None:
    table = tl.bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(table[b] == chr(b) for b in range(ord("!"), ord("~") + 1))  # printable ASCII is itself


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=200))
def test_tokenizer_round_trips_any_text(saved_tokenizer, text: str) -> None:
    ids = saved_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert saved_tokenizer.decode(ids) == text


def test_tokenizer_fixed_cases(saved_tokenizer) -> None:
    for text in ["  def f(x):\n\treturn x  ", "héllo ✓ 日本 🎉", "\x00\x01\x7f\r\n", " . , 'll n't", ""]:
        assert saved_tokenizer.encode(text) == list(text.encode())
        assert saved_tokenizer.decode(list(text.encode())) == text
    assert len(saved_tokenizer) == 256 and saved_tokenizer.all_special_ids == []


def test_stdlib_file_list_and_split_are_deterministic() -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = tl.stdlib_files(root)
    assert files == tl.stdlib_files(root)
    assert files == sorted(files, key=lambda p: p.as_posix())
    assert all(p.suffix == ".py" for p in files)
    assert not any(set(p.parts) & {"test", "tests", "site-packages", "idle_test"} for p in files)
    held = [p for p in files if tl.is_heldout(p)]
    assert 0.02 < len(held) / len(files) < 0.10
    assert held == [p for p in files if tl.is_heldout(Path(p.as_posix()))]


def test_spread_slice_keeps_whole_lines() -> None:
    lines = [f"line {i} é\n".encode() for i in range(5000)]
    data = b"".join(lines)
    text = tl.spread_slice(data, 4096, pieces=8)
    assert 2000 < len(text.encode()) <= 4096
    assert set(text.splitlines(keepends=True)) <= {ln.decode() for ln in lines}
    assert tl.spread_slice(b"short\n", 4096) == "short\n"


def _fake_stdlib(root: Path) -> Path:
    """A small corpus of repetitive Python so a toy model learns visibly in seconds."""
    root.mkdir()
    for i in range(60):
        body = "".join(f"def func_{i}_{j}(x, y):\n    return x + y * {j}\n\n" for j in range(60))
        (root / f"mod{i:02d}.py").write_text(body)
    for skipped in ("test", "site-packages"):
        (root / skipped).mkdir()
        (root / skipped / "skip_me.py").write_text("SKIPPED = True\n" * 100)
    assert any(tl.is_heldout(Path(f"mod{i:02d}.py")) for i in range(60))
    return root


def test_tiny_training_saves_a_loadable_model(tmp_path: Path, capsys) -> None:
    corpus = _fake_stdlib(tmp_path / "lib")
    out = tmp_path / "models" / "tinylm"
    cfg = tl.TrainConfig(
        out=out,
        minutes=4 / 60,
        tiny=True,
        batch_size=8,
        seq_len=64,
        lr=1e-2,
        warmup_steps=5,
        corpus_root=corpus,
        calib_bytes=8192,
        heldout_bytes=8192,
        progress=False,
        threads=1,  # one thread: robust when the test machine is busy
    )
    meta = tl.train(cfg)
    assert meta["last_loss"] < meta["first_loss"] - 0.5
    assert meta["corpus"]["files"] == 60 and meta["corpus"]["heldout_files"] >= 1
    assert tl.is_complete(out)
    assert json.loads((out / "tinylm.json").read_text())["heldout"] == meta["heldout"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["tinylm"]  # no temp dirs left behind

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert (
        json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"]
        == "PreTrainedTokenizerFast"
    )
    assert model.config.num_key_value_heads == 2 and model.config.vocab_size == 256
    text = (out / "heldout.txt").read_text()
    ids = torch.tensor([tok(text[:64], add_special_tokens=False)["input_ids"]])
    assert ids.tolist()[0] == list(text[:64].encode())
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    assert nll < 0.9 * torch.log(torch.tensor(256.0)).item()  # far better than uniform

    # A finished directory is reused, not retrained.
    assert tl.main(["--out", str(out), "--tiny", "--no-progress"]) == 0
    assert "already trained" in capsys.readouterr().out


def test_refuses_to_overwrite_foreign_directory(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--force"):
        tl.train(tl.TrainConfig(out=out, tiny=True, steps=1, progress=False))
    assert tl.main(["--out", str(out), "--tiny", "--steps", "1", "--threads", "1", "--no-progress"]) == 2
    assert (out / "precious.txt").read_text() == "keep me"


def test_force_replaces_atomically(tmp_path: Path) -> None:
    corpus = _fake_stdlib(tmp_path / "lib")
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    cfg = tl.TrainConfig(
        out=out,
        steps=3,
        tiny=True,
        seq_len=32,
        force=True,
        corpus_root=corpus,
        calib_bytes=2048,
        heldout_bytes=2048,
        progress=False,
        threads=1,
    )
    threads = torch.get_num_threads()
    meta = tl.train(cfg)
    assert torch.get_num_threads() == threads  # the caller's setting is restored
    assert meta["steps"] == 3 and tl.is_complete(out) and not (out / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lib", "model"]


def test_fixed_steps_are_reproducible(tmp_path: Path) -> None:
    corpus = _fake_stdlib(tmp_path / "lib")
    runs = []
    for name in ("a", "b"):
        cfg = tl.TrainConfig(
            out=tmp_path / name,
            steps=5,
            tiny=True,
            seq_len=32,
            corpus_root=corpus,
            calib_bytes=1024,
            heldout_bytes=1024,
            progress=False,
            threads=1,
        )
        runs.append(tl.train(cfg))
    assert runs[0]["last_loss"] == runs[1]["last_loss"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()


def test_slmopt_data_with_the_real_tokenizer(saved_tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("".join(f"x_{i} = 'é✓'  # {i}\n" for i in range(300)), encoding="utf-8")
    by_tokenizer = eval_windows(path, seq_len=64, tokenizer=saved_tokenizer)
    by_bytes = eval_windows(path, seq_len=64, byte_level=True)
    assert torch.equal(by_tokenizer.tokens, by_bytes.tokens)
    # Offsets are per character, so a window ending inside a multi-byte character counts it whole.
    assert by_tokenizer.bytes_per_token == pytest.approx(1.0, abs=3 / by_tokenizer.tokens.numel())
