"""Data and models as users hand them over: id rows as given, factories without example inputs, 2-D inputs.

Every compile goes through the CLI exactly as the README shows it; the checks read the written report and
run the written ONNX file against an independent reference (the user's own module, or the file's rows).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from slmopt.cli import main
from slmopt.data.samples import calibration_tokens, evaluation_data
from tests.models import zoo_config

HIDDEN = 32
COMMON = ["--no-bench", "-q", "--no-progress"]
ROOT = Path(__file__).resolve().parents[2]


class FFN(nn.Module):
    """A bare SwiGLU FFN over ``[..., hidden]`` (no residual, no attention): what a user may hand over."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(HIDDEN, 64, bias=False)
        self.up = nn.Linear(HIDDEN, 64, bias=False)
        self.down = nn.Linear(64, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


class Flatten(nn.Module):
    """Reads exactly 16 positions (flattens them into one vector): its sequence axis cannot vary."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16 * HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.flatten(1))


def ffn_only() -> nn.Module:
    """``module:factory`` returning only the module: example inputs must come from ``--calib``."""
    torch.manual_seed(0)
    return FFN().eval()


def ffn_2d() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """``module:factory`` whose example input is 2-D ``[tokens, hidden]``."""
    torch.manual_seed(0)
    return FFN().eval(), (torch.randn(10, HIDDEN),)


def flatten_3d() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return Flatten().eval(), (torch.randn(2, 16, HIDDEN),)


def _rows(path: Path, rows: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(0, vocab, size=(rows, length), dtype=np.int64)
    np.save(path, ids)
    return ids


@pytest.fixture(scope="module")
def llama_256(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The zoo Llama with a 256-token context: the default window (256) is longer than 64-token rows."""
    from transformers import LlamaForCausalLM

    cfg = zoo_config("llama")
    cfg.max_position_embeddings = 256
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama256")
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------- ids rows as given
def test_rows_are_used_whole_and_text_is_windowed(tmp_path: Path) -> None:
    ids = _rows(tmp_path / "ids.npy", rows=12, length=64, vocab=128)
    tokens, note = calibration_tokens(tmp_path / "ids.npy", seq_len=None, num_samples=8, seed=1, context=256)
    assert tokens.shape == (8, 64) and "used as given" in note
    file_rows = {tuple(r) for r in ids.tolist()}
    assert len({tuple(r) for r in tokens.tolist()} & file_rows) == 8  # 8 distinct rows of the file, whole
    windowed, note = calibration_tokens(tmp_path / "ids.npy", seq_len=32, num_samples=100, context=256)
    assert windowed.shape == (24, 32) and note == "24 windows of 32 tokens from ids.npy"
    capped, note = calibration_tokens(tmp_path / "ids.npy", seq_len=None, num_samples=100, context=48)
    assert capped.shape == (12, 48) and "exceed the model's context of 48" in note
    (tmp_path / "calib.txt").write_text("x" * 600)
    text, note = calibration_tokens(tmp_path / "calib.txt", seq_len=None, num_samples=9, byte_level=True)
    assert text.shape == (2, 256) and note == "2 windows of 256 tokens from calib.txt"
    data, note = evaluation_data(tmp_path / "ids.npy", seq_len=None, max_windows=5, context=256)
    assert torch.equal(data.tokens, torch.from_numpy(ids[:5])) and "used as given" in note


def test_compile_with_64_token_rows_needs_no_seq_len(llama_256: Path, tmp_path: Path, capsys) -> None:
    _rows(tmp_path / "ids.npy", rows=16, length=64, vocab=128)
    _rows(tmp_path / "eval.npy", rows=4, length=64, vocab=128, seed=1)
    out = tmp_path / "out"
    args = ["--passes", "mask-2to4{method=wanda}", "--calib", str(tmp_path / "ids.npy")]
    code = main(
        ["compile", str(llama_256), *args, "--eval", str(tmp_path / "eval.npy"), "-o", str(out), *COMMON]
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["calibration"].startswith("16 rows of 64 tokens from ids.npy, used as given")
    assert report["data"]["evaluation"].startswith("4 rows of 64 tokens from eval.npy, used as given")
    assert report["quality"]["before"]["tokens"] == 4 * 63  # every row whole: 63 predictions each
    assert "calibration data: 16 rows of 64 tokens" in (out / "report.md").read_text()


# --------------------------------------------------------------------------------- factories
def _onnx_run(folder: Path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("factory", ["ffn_only", "ffn_2d"])
def test_factory_with_2d_inputs_compiles_with_a_dynamic_token_axis(
    factory: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(ROOT)  # the factory must be importable, as with `python -m`
    calib = torch.randn(40, HIDDEN, generator=torch.Generator().manual_seed(2))
    np.save(tmp_path / "x.npy", calib.numpy())
    out = tmp_path / "out"
    spec = f"tests.e2e.test_user_inputs:{factory}"
    code = main(["compile", spec, "--calib", str(tmp_path / "x.npy"), "-o", str(out), *COMMON])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["dynamic_dims"] == [{"0": "tokens"}]
    assert report["parity"]["passed"] and report["parity"]["shapes"] == 2
    if factory == "ffn_only":
        assert "first 2 calibration samples" in report["data"]["example inputs"]
    reference = ffn_only()  # the user's module, run in plain PyTorch
    for rows in (1, 7, 40):  # any number of tokens, not just the example's
        x = calib[:rows]
        torch.testing.assert_close(_onnx_run(out, x), reference(x).detach(), rtol=1e-5, atol=1e-5)


def test_factory_without_inputs_or_calibration_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(ROOT)
    code = main(["compile", "tests.e2e.test_user_inputs:ffn_only", "-o", str(tmp_path / "o"), *COMMON])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--calib with a .npy/.pt file of its inputs" in err[0], err


def test_inputs_whose_axes_cannot_vary_get_one_line_naming_the_expected_shapes(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(ROOT)
    code = main(["compile", "tests.e2e.test_user_inputs:flatten_3d", "-o", str(tmp_path / "o"), *COMMON])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "[2, 16, 32]" in err[0] and "expects [batch, seq, hidden, ...]" in err[0]
