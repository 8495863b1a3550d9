"""Tests for slmopt.data.windows: window cutting invariants, determinism, sources and error messages."""

from __future__ import annotations

import logging
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slmopt.data.windows import DataSpec, eval_windows, load_tensor_inputs, load_tokens, window_offsets


def _npy(path: Path, arr: np.ndarray) -> str:
    np.save(path, arr)
    return str(path)


class CharPairTokenizer:
    """A stand-in for an HF fast tokenizer: one token per two characters, id = ord(first) % 50."""

    is_fast = True

    def __call__(self, text: str, add_special_tokens: bool = True, verbose: bool = True, **kw) -> dict:
        assert add_special_tokens is False  # a data stream must not get BOS/EOS inserted
        spans = [(i, min(i + 2, len(text))) for i in range(0, len(text), 2)]
        out = {"input_ids": [ord(text[a]) % 50 for a, _ in spans]}
        if kw.get("return_offsets_mapping"):
            out["offset_mapping"] = spans
        return out


# ---------------------------------------------------------------- window cutting


def test_window_offsets_examples() -> None:
    assert window_offsets(10, 4) == [0, 4]
    assert window_offsets(10, 4, shift=2) == [2, 6]
    assert window_offsets(3, 4) == []
    with pytest.raises(ValueError):
        window_offsets(10, 0)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 400),
    seq_len=st.integers(1, 64),
    num_samples=st.integers(1, 20),
    seed=st.integers(0, 2**31 - 1),
)
def test_windows_in_bounds_non_overlapping(tmp_path_factory, n, seq_len, num_samples, seed) -> None:
    # Token value == position in the stream, so every window reveals where it was cut.
    path = _npy(tmp_path_factory.mktemp("w") / "ids.npy", np.arange(n, dtype=np.int64))
    spec = DataSpec(path, seq_len=seq_len, num_samples=num_samples, seed=seed)
    if n < seq_len:
        with pytest.raises(ValueError, match="too short"):
            load_tokens(spec)
        return
    tokens = load_tokens(spec)
    assert tokens.dtype == torch.int64
    assert tokens.shape == (min(num_samples, n // seq_len), seq_len)
    starts = sorted(int(s) for s in tokens[:, 0])
    for row in tokens:
        assert torch.equal(row, torch.arange(int(row[0]), int(row[0]) + seq_len))  # contiguous
        assert int(row[0]) >= 0 and int(row[-1]) < n  # in bounds
    assert all(b - a >= seq_len for a, b in pairwise(starts))  # non-overlapping


def test_same_seed_same_windows_other_seed_differs(tmp_path: Path) -> None:
    path = _npy(tmp_path / "ids.npy", np.arange(10_000) % 997)
    a = load_tokens(DataSpec(path, seq_len=32, num_samples=8, seed=0))
    b = load_tokens(DataSpec(path, seq_len=32, num_samples=8, seed=0))
    c = load_tokens(DataSpec(path, seq_len=32, num_samples=8, seed=1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_more_samples_extend_the_same_order(tmp_path: Path) -> None:
    path = _npy(tmp_path / "ids.npy", np.arange(5000))
    few = load_tokens(DataSpec(path, seq_len=16, num_samples=5, seed=3))
    many = load_tokens(DataSpec(path, seq_len=16, num_samples=12, seed=3))
    assert torch.equal(many[:5], few)


def test_two_d_rows_are_never_crossed(tmp_path: Path) -> None:
    rows, length, seq = 7, 50, 16
    arr = np.arange(rows)[:, None] * 1000 + np.arange(length)[None, :]
    tokens = load_tokens(DataSpec(_npy(tmp_path / "r.npy", arr), seq_len=seq, num_samples=100))
    assert tokens.shape == (rows * (length // seq), seq)
    assert bool(((tokens // 1000) == (tokens[:, :1] // 1000)).all())  # one row per window
    assert torch.equal(tokens - tokens[:, :1], torch.arange(seq).expand_as(tokens))


def test_fewer_windows_than_asked_warns(tmp_path: Path, caplog) -> None:
    path = _npy(tmp_path / "ids.npy", np.arange(100))
    with caplog.at_level(logging.WARNING, logger="slmopt.data.windows"):
        tokens = load_tokens(DataSpec(path, seq_len=30, num_samples=10))
    assert tokens.shape == (3, 30)
    assert "only 3 windows" in caplog.text and "ids.npy" in caplog.text


# ---------------------------------------------------------------- sources


def test_byte_level_text_windows_are_substrings(tmp_path: Path) -> None:
    text = "".join(f"def f{i}(x):\n    return x * {i}  # é\n" for i in range(200))
    path = tmp_path / "calib.txt"
    path.write_text(text, encoding="utf-8")
    raw = text.encode("utf-8")
    tokens = load_tokens(
        DataSpec(str(path), seq_len=64, num_samples=10, seed=5), byte_level=True, vocab_size=256
    )
    assert tokens.shape == (10, 64)
    for row in tokens:
        assert bytes(row.tolist()) in raw


def test_pt_and_npy_give_same_windows(tmp_path: Path) -> None:
    ids = (np.arange(3000) * 7) % 211
    torch.save(torch.from_numpy(ids), tmp_path / "ids.pt")
    spec_pt = DataSpec(str(tmp_path / "ids.pt"), seq_len=20, num_samples=9, seed=2)
    spec_np = DataSpec(_npy(tmp_path / "ids.npy", ids.astype(np.int32)), seq_len=20, num_samples=9, seed=2)
    assert torch.equal(load_tokens(spec_pt, vocab_size=211), load_tokens(spec_np, vocab_size=211))


def test_tokenizer_text(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("abcdefgh" * 40, encoding="utf-8")  # 160 tokens of "ac eg" pairs
    tokens = load_tokens(DataSpec(str(path), seq_len=8, num_samples=4), tokenizer=CharPairTokenizer())
    assert tokens.shape == (4, 8)
    expected = {ord(c) % 50 for c in "aceg"}
    assert set(tokens.flatten().tolist()) == expected


def test_eval_windows_contiguous_from_start(tmp_path: Path) -> None:
    text = "".join(chr(65 + i % 26) for i in range(1000))
    path = tmp_path / "heldout.txt"
    path.write_text(text, encoding="utf-8")
    data = eval_windows(path, seq_len=64, byte_level=True)
    assert data.tokens.shape == (1000 // 64, 64)
    assert bytes(data.tokens.flatten().tolist()) == text.encode()[: 15 * 64]
    assert data.bytes_per_token == 1.0 and data.total_tokens == 1000
    assert eval_windows(path, seq_len=64, max_windows=4, byte_level=True).tokens.shape == (4, 64)
    assert torch.equal(eval_windows(path, seq_len=64, byte_level=True).tokens, data.tokens)


def test_eval_windows_bytes_per_token_of_evaluated_text(tmp_path: Path) -> None:
    text = "aé" * 50 + "zz" * 50  # first half 3 bytes per pair, second half 2 bytes per pair
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    data = eval_windows(path, seq_len=10, max_windows=5, tokenizer=CharPairTokenizer())
    # 50 tokens evaluated = the first 100 characters = 50 * "aé" = 150 bytes.
    assert data.tokens.shape == (5, 10)
    assert data.bytes_per_token == pytest.approx(150 / 50)
    assert data.total_tokens == 100


def test_eval_windows_array_has_unknown_bytes(tmp_path: Path) -> None:
    data = eval_windows(_npy(tmp_path / "e.npy", np.arange(100)), seq_len=10)
    assert data.bytes_per_token is None
    assert torch.equal(data.tokens.flatten(), torch.arange(100))


def test_load_tensor_inputs(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((6, 3, 4)).astype(np.float32)
    out = load_tensor_inputs(_npy(tmp_path / "x.npy", x), num_samples=4)
    assert out.dtype == torch.float32 and torch.equal(out, torch.from_numpy(x[:4]))
    torch.save(torch.ones(2, 5), tmp_path / "x.pt")
    assert load_tensor_inputs(tmp_path / "x.pt").shape == (2, 5)


# ---------------------------------------------------------------- errors name the file


class NotATensor:
    pass


def _bad_files(tmp: Path) -> dict[str, tuple[Path, dict, str]]:
    cases: dict[str, tuple[Path, dict, str]] = {}
    cases["missing"] = (tmp / "nope.txt", {"byte_level": True}, "does not exist")
    (tmp / "empty.txt").write_bytes(b"")
    cases["empty"] = (tmp / "empty.txt", {"byte_level": True}, "empty")
    (tmp / "nul.txt").write_bytes(b"abc\x00def" * 100)
    cases["binary"] = (tmp / "nul.txt", {"byte_level": True}, "binary")
    (tmp / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    cases["undecodable"] = (tmp / "latin1.txt", {"byte_level": True}, "not valid UTF-8")
    (tmp / "plain.txt").write_text("hello " * 100)
    cases["no tokenizer"] = (tmp / "plain.txt", {}, "tokenizer")
    cases["vocab"] = (tmp / "plain.txt", {"byte_level": True, "vocab_size": 100}, ">= vocab_size 100")
    cases["negative"] = (Path(_npy(tmp / "neg.npy", np.array([1, 2, -3] * 50))), {}, "negative")
    cases["float"] = (Path(_npy(tmp / "f.npy", np.ones(500, np.float32))), {}, "dtype")
    cases["3d"] = (Path(_npy(tmp / "s.npy", np.ones((2, 2, 200), np.int64))), {}, "shape")
    torch.save({"ids": torch.arange(500)}, tmp / "dict.pt")
    cases["pt dict"] = (tmp / "dict.pt", {}, "single tensor")
    torch.save(NotATensor(), tmp / "pickle.pt")
    cases["pt pickle"] = (tmp / "pickle.pt", {}, "cannot read")
    (tmp / "garbage.npy").write_bytes(b"not an npy file at all")
    cases["bad npy"] = (tmp / "garbage.npy", {}, "cannot read")
    (tmp / "short.txt").write_text("x" * 10)
    cases["too short"] = (tmp / "short.txt", {"byte_level": True}, "too short: 10 tokens, need at least 32")
    return cases


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "empty",
        "binary",
        "undecodable",
        "no tokenizer",
        "vocab",
        "negative",
        "float",
        "3d",
        "pt dict",
        "pt pickle",
        "bad npy",
        "too short",
    ],
)
def test_errors_are_value_errors_naming_the_file(tmp_path: Path, case: str) -> None:
    path, kwargs, fragment = _bad_files(tmp_path)[case]
    with pytest.raises(ValueError, match=fragment) as info:
        load_tokens(DataSpec(str(path), seq_len=32, num_samples=4), **kwargs)
    assert str(path) in str(info.value)
    with pytest.raises(ValueError) as info:
        eval_windows(path, seq_len=32, **kwargs)
    assert str(path) in str(info.value)


def test_tensor_input_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("1 2 3")
    torch.save(torch.tensor(3.0), tmp_path / "scalar.pt")
    np.save(tmp_path / "none.npy", np.zeros((0, 4), np.float32))
    for name in ("x.txt", "scalar.pt", "none.npy", "missing.npy"):
        with pytest.raises(ValueError) as info:
            load_tensor_inputs(tmp_path / name)
        assert name in str(info.value)


@pytest.mark.parametrize("kwargs", [{"seq_len": 0}, {"num_samples": 0}, {"seq_len": 2.5}, {"seed": "a"}])
def test_dataspec_validates(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        DataSpec("x.txt", **kwargs)
