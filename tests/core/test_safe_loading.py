"""Untrusted inputs never run pickled code: a planted ``__reduce__`` payload is refused with one clear line.

Each case plants a pickle whose ``__reduce__`` would create a marker file, feeds it through every path that
reads pickles (calibration ``.pt``, an HF folder with only ``pytorch_model.bin``, a ``.pt2`` archive), and
checks exit code 2, the message, and that the marker was never created. The ``.pt2`` case first shows the
payload is live: plain ``torch.export.load`` does run it.
"""

from __future__ import annotations

import io
import logging
import os
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.export import Dim

from slmopt.cli import main
from slmopt.errors import UserError
from slmopt.safe_load import safe_export_load
from tests.models import save_hf


class Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, 8)
        self.head = nn.Linear(8, 32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids))


def _save_pt2(path: Path) -> Path:
    ids = torch.randint(0, 32, (2, 8))
    ep = torch.export.export(
        TokenModel().eval(), (ids,), dynamic_shapes=({0: Dim("batch"), 1: Dim("seq", max=64)},)
    )
    torch.export.save(ep, str(path))
    return path


def _plant_in_pt2(good: Path, bad: Path, marker: Path) -> None:
    """Copies ``good`` with its sample-inputs member replaced by a pickled payload."""
    payload = io.BytesIO()
    torch.save((Payload(marker),), payload)
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        names = src.namelist()
        targets = [n for n in names if "sample_inputs" in n]
        assert targets, names  # the archive layout this test relies on
        for name in names:
            dst.writestr(name, payload.getvalue() if name in targets else src.read(name))


def _assert_refused(capsys, argv: list[str], marker: Path, needle: str = "refusing to load") -> None:
    capsys.readouterr()  # drop what setup printed (save_pretrained's progress bar)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.count("\n") == 0 and err.startswith("slmopt: error:"), err
    assert needle in err and "Traceback" not in err
    assert not marker.exists(), "the planted pickle was executed"


def test_pt2_payload_is_live_with_plain_torch_but_refused_by_slmopt(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "PWNED"
    good = _save_pt2(tmp_path / "good.pt2")
    bad = tmp_path / "bad.pt2"
    _plant_in_pt2(good, bad, marker)
    # torch 2.13's fallback warning has one argument for two %s: pytest's log capture turns that into a
    # TypeError before the payload runs. The warning is torch's, not ours, so its logger is silenced here.
    monkeypatch.setattr(logging.getLogger("torch._export.serde.serialize"), "disabled", True)
    torch.export.load(str(bad))  # plain torch falls back to weights_only=False: the payload runs
    assert marker.exists()
    marker.unlink()
    capsys.readouterr()  # torch's own fallback warning (a logging error in torch 2.13) is not ours
    with pytest.raises(UserError, match="refusing to load"):
        safe_export_load(bad)
    assert not marker.exists()
    _assert_refused(capsys, ["inspect", str(bad)], marker)
    _assert_refused(capsys, ["compile", str(bad), "-o", str(tmp_path / "out")], marker)
    assert not (tmp_path / "out").exists()


def test_safe_export_load_still_loads_a_clean_pt2_and_restores_torch_load(tmp_path):
    real_load = torch.load
    good = _save_pt2(tmp_path / "good.pt2")
    ep = safe_export_load(good)
    ids = torch.randint(0, 32, (3, 5))
    reference = torch.export.load(str(good)).module()(ids)
    torch.testing.assert_close(ep.module()(ids), reference, rtol=0, atol=0)
    assert torch.load is real_load


def test_hf_folder_with_malicious_pytorch_model_bin(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    model = save_hf("llama", tmp_path / "model")
    for f in model.glob("*.safetensors"):
        f.unlink()
    torch.save({"model.embed_tokens.weight": Payload(marker)}, model / "pytorch_model.bin")
    _assert_refused(capsys, ["compile", str(model), "-o", str(tmp_path / "out")], marker)
    assert not (tmp_path / "out").exists()


def test_calibration_pt_with_payload(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    model = save_hf("llama", tmp_path / "model")
    calib = tmp_path / "calib.pt"
    torch.save({"ids": Payload(marker)}, calib)
    argv = ["compile", str(model), "--passes", "mask-2to4{method=wanda}", "--calib", str(calib)]
    _assert_refused(capsys, [*argv, "-o", str(tmp_path / "out")], marker)
    assert not (tmp_path / "out").exists()
    # The same file as eval data is refused the same way.
    _assert_refused(capsys, ["eval", str(model), "--data", str(calib)], marker)
