"""End to end: `slmopt compile` with mask-2to4 on every model kind, through the CLI and the Python API."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import slmopt
from slmopt.cli import main
from slmopt.loaders import model_files
from tests.helpers import save_token_ids
from tests.models import VOCAB, build_model, save_hf, toy_block


def _hashes(path: Path) -> dict[str, str]:
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in model_files(path)}


@pytest.fixture(scope="module")
def ids_file(tmp_path_factory) -> Path:
    """Calibration token ids for the zoo's vocabulary (the zoo models have no tokenizer)."""
    path = tmp_path_factory.mktemp("data") / "calib.npy"
    save_token_ids(path, 4096)
    return path


def _nm_ok_along_reduction(model: onnx.ModelProto) -> int:
    """Independent 2:4 check: every MatMul B initializer [in, out] must have ≤ 2 nonzeros per 4 inputs."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    sparse = 0
    for node in model.graph.node:
        weight = (
            inits.get(node.input[1]) if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 else None
        )
        if weight is None or weight.ndim != 2:
            continue
        trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
        w_in_out = weight.T if trans_b else weight  # reduction axis first
        if (w_in_out == 0).mean() < 0.5 or w_in_out.shape[0] % 4:
            continue
        groups = w_in_out.reshape(-1, 4, w_in_out.shape[1])
        assert ((groups != 0).sum(axis=1) <= 2).all(), node.name
        assert not np.signbit(w_in_out[w_in_out == 0]).any(), "negative zeros"
        sparse += 1
    return sparse


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2", "bert"])
def test_compile_hf_folders(tmp_path, capsys, ids_file, name):
    model_dir = save_hf(name, tmp_path / name)
    before = _hashes(model_dir)
    out = tmp_path / "out"
    code = main(
        ["compile", str(model_dir), "--passes", "mask-2to4{method=sparsegpt}", "--calib", str(ids_file),
         "--seq-len", "32", "--num-samples", "8", "--no-bench", "--no-progress", "-o", str(out), "-q"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert _hashes(model_dir) == before, "the input model was modified"
    report = json.loads((out / "report.json").read_text())
    assert report["parity"]["max_abs_diff"] <= 1e-4
    assert report["checks"]["onnx_2to4"]["passed"] is True
    masked = len(report["passes"][0]["changes"])
    assert masked >= 6
    # The checker's verdict, re-derived independently from the saved file.
    assert _nm_ok_along_reduction(onnx.load(out / "model.onnx")) >= 1
    # Causal LMs also get the KV-cache decoder for `slmopt generate` (slmopt.backends.onnxrt.generation).
    files = {"model.onnx", "report.json", "report.md", "slmopt.json"}
    files |= {"decoder.onnx", "genai_config.json", "slmopt_generation.json"} if name != "bert" else set()
    assert {p.name for p in out.iterdir()} == files


def test_compile_pt2_and_eval(tmp_path, capsys, ids_file):
    from slmopt.loaders import LogitsOnly

    wrapper = LogitsOnly(build_model("llama")).eval()
    ids = torch.randint(0, VOCAB, (2, 16))
    static = torch.export.export(wrapper, (ids,), strict=False)
    torch.export.save(static, tmp_path / "static.pt2")
    code = main(["compile", str(tmp_path / "static.pt2"), "-o", str(tmp_path / "o"), "--no-bench"])
    assert code == 2 and "static batch size" in capsys.readouterr().err
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=128)
    ep = torch.export.export(wrapper, (ids,), dynamic_shapes={"input_ids": {0: batch, 1: seq}}, strict=False)
    pt2 = tmp_path / "llama.pt2"
    torch.export.save(ep, pt2)
    before = _hashes(pt2)
    out = tmp_path / "out"
    code = main(
        ["compile", str(pt2), "--passes", "mask-2to4{method=wanda}", "--calib", str(ids_file), "--seq-len", "32",
         "--num-samples", "8", "--no-bench", "--no-progress", "-o", str(out), "-q"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert _hashes(pt2) == before
    report = json.loads((out / "report.json").read_text())
    assert report["parity"]["max_abs_diff"] <= 1e-4 and report["checks"]["onnx_2to4"]["passed"]
    capsys.readouterr()
    assert (
        main(
            ["eval", str(out), "--data", str(ids_file), "--seq-len", "32", "--samples", "4", "--no-progress"]
        )
        == 0
    )
    quality = json.loads(capsys.readouterr().out)
    # Independent reference: cross entropy of the engine's own logits computed here with torch.
    engine = slmopt.lowering.load_engine(out)
    tokens = torch.from_numpy(np.load(ids_file)[: 4 * 32].reshape(4, 32))
    logits = engine(tokens)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    assert quality["nats_per_token"] == pytest.approx(nll.item(), rel=1e-4)


def test_compile_factory_with_tensor_calibration(tmp_path, monkeypatch):
    module, (x,) = toy_block()
    calib = tmp_path / "inputs.pt"
    torch.save(torch.randn(8, *x.shape[1:]), calib)
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    result = slmopt.compile(
        "tests.models:toy_block",
        passes="mask-2to4{method=sparsegpt}",
        calib=str(calib),
        output_dir=tmp_path / "out",
        progress=False,
    )
    assert result.report.parity["max_abs_diff"] <= 1e-4
    assert result.report.checks["onnx_2to4"]["passed"]
    assert result.artifacts["onnx"] == tmp_path / "out" / "model.onnx"
    assert result.report.model["kind"] == "module"


def test_python_api_torch_backend_and_force(tmp_path):
    model_dir = save_hf("qwen2", tmp_path / "qwen2")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old run")
    result = slmopt.compile(
        str(model_dir), passes="sparsity{method=magnitude}", backend="torch", output_dir=out, force=True,
        bench=False, progress=False,
    )  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["program.pt2", "report.json", "report.md", "slmopt.json"]
    assert result.report.parity["max_abs_diff"] <= 1e-5
    # The transformed program's block linears are 2:4 along their input dim; the lm head is untouched.
    for change in result.report.passes[0]["changes"]:
        w = result.program.param(change["target"])
        groups = w.reshape(w.shape[0], -1, 4)
        assert ((groups != 0).sum(-1) <= 2).all()
    lm_head = result.program.param("model.lm_head.weight")
    assert (lm_head != 0).all()


def test_interrupted_compile_leaves_nothing(tmp_path, monkeypatch):
    """A failure after lowering started removes the temporary folder and writes no output."""
    model_dir = save_hf("llama", tmp_path / "llama")
    from slmopt import artifacts

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifacts, "parity", explode)
    with pytest.raises(KeyboardInterrupt):
        slmopt.compile(str(model_dir), passes="sparsity{method=magnitude}", output_dir=tmp_path / "out",
                       bench=False, progress=False)  # fmt: skip
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "llama"]
    assert leftovers == []
