"""backends/onnxrt/rewrite.py: exported RMSNorms reach ONNX Runtime in the spelling its fusion matches."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import torch

from slmopt.backends.onnxrt.export import export_onnx
from tests.models import capture_model, example_ids


@pytest.fixture(scope="module")
def llama_onnx(tmp_path_factory):
    program = capture_model("llama")
    path = tmp_path_factory.mktemp("rewrite") / "model.onnx"
    meta = export_onnx(program, path)
    return program, path, meta


def _optimized(path, tmp_path) -> onnx.ModelProto:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return onnx.load(str(tmp_path / "optimized.onnx"))


def test_every_rmsnorm_is_fused_by_onnxruntime(llama_onnx, tmp_path) -> None:
    program, path, meta = llama_onnx
    norms = sum(1 for n in program.graph.nodes if n.target is torch.ops.aten.rsqrt.default)
    assert norms > 0 and meta["ort_rewrites"]["rsqrt_mul_to_div"] == norms
    exported = onnx.load(str(path), load_external_data=False)
    assert not any(n.op_type == "Reciprocal" for n in exported.graph.node)
    ops = [n.op_type for n in _optimized(path, tmp_path).graph.node]
    fused = sum(op.endswith("SimplifiedLayerNormalization") for op in ops)
    assert fused == norms, ops


def test_rewritten_model_matches_torch(llama_onnx) -> None:
    program, path, _ = llama_onnx
    ids = example_ids(2, 12, seed=5)
    with torch.no_grad():
        expected = program.graph_module(ids)
    expected = expected[0] if isinstance(expected, (tuple, list)) else expected
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
    assert torch.allclose(torch.from_numpy(got), expected.float(), atol=1e-4, rtol=1e-4)
