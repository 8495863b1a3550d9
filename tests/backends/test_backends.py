"""Backends: torch (``program.pt2``) and onnxruntime (``model.onnx``) round trips on the tiny model zoo.

References are independent of the code under test: the Program itself (run eagerly by torch), the raw
model's ``nn.Linear``/``Conv1D`` modules for MatMul counts, and ``onnx.checker`` / ``onnx.load`` for the
files.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from slmopt.backends.onnxrt.backend import (
    MAX_IR_VERSION,
    OnnxRuntimeBackend,
    OnnxRuntimeEngine,
    make_session,
    onnx_op_histogram,
    run_onnx,
)
from slmopt.backends.torch_backend import TorchBackend
from slmopt.lowering import get_backend
from slmopt.program import ModelInfo, Program, capture
from tests.helpers import captured
from tests.models import ZOO, build_model, example_ids, toy_block, zoo_config

SHAPES = [(1, 7), (3, 33)]  # both differ from the capture example [2, 16]
ORT_ATOL = 1e-4
OUTPUT_NAME = {"causal-lm": "logits", "encoder": "last_hidden_state", "module": "output"}


def _ids(name: str, shape: tuple[int, int]) -> torch.Tensor:
    return example_ids(*shape, vocab=zoo_config(name).vocab_size, seed=shape[0] * 100 + shape[1])


def _num_linears(model: nn.Module) -> int:
    """Dense projections of the raw model: nn.Linear, plus GPT-2's Conv1D (a transposed linear)."""
    return sum(type(m).__name__ in ("Linear", "Conv1D") for m in model.modules())


# ------------------------------------------------------------------------------------------- torch
@pytest.mark.parametrize("name", ["llama", "tiny"])
def test_torch_backend_round_trip_dynamic_shapes(name: str, tmp_path: Path) -> None:
    program = captured(name)
    result = get_backend("torch").lower(program, tmp_path, {})
    assert result.backend == "torch"
    assert result.artifacts == {"program": "program.pt2"}
    assert (tmp_path / "program.pt2").stat().st_size == result.metadata["file_size_bytes"]
    engine = TorchBackend().load(tmp_path, threads=1)
    assert torch.get_num_threads() == 1
    for shape in SHAPES:
        ids = _ids(name, shape)
        expected = program(ids)
        got = engine(ids)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= 1e-6


def test_torch_backend_missing_archive_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="program.pt2"):
        TorchBackend().load(tmp_path)


class _FFFBlock(nn.Module):
    """Calls the custom op ``slmopt::fff`` (never run here: running it may build the native kernel)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.node_w = nn.Parameter(torch.randn(3, 8, generator=g))
        self.node_b = nn.Parameter(torch.zeros(3))
        self.leaf_w1 = nn.Parameter(torch.randn(4, 2, 8, generator=g))
        self.leaf_w2 = nn.Parameter(torch.randn(4, 2, 8, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from slmopt.ops import fff

        return fff(x, self.node_w, self.node_b, leaf_w1=self.leaf_w1, leaf_w2=self.leaf_w2, activation="relu")


def test_torch_backend_keeps_custom_ops(tmp_path: Path) -> None:
    info = ModelInfo(kind="module", source="t", input_names=["x"], dynamic_dims=[{0: "batch"}])
    program = capture(_FFFBlock(), (torch.randn(4, 8),), info)
    result = TorchBackend().lower(program, tmp_path, {})
    assert result.metadata["custom_ops"] == ["slmopt::fff"]
    engine = TorchBackend().load(tmp_path)
    targets = {str(n.target) for n in engine.module.graph.nodes if n.op == "call_function"}
    assert "slmopt.fff.default" in targets


# ----------------------------------------------------------------------------------------- onnxruntime
CACHED = {"gpt2", "llama", "qwen2"}  # zoo causal LMs whose attention is scaled_dot_product_attention


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2", "bert", "tiny"])
def test_onnxruntime_backend_zoo(name: str, tmp_path: Path) -> None:
    program = captured(name)
    result = get_backend("onnxruntime").lower(program, tmp_path, {"verify": True})
    path = tmp_path / "model.onnx"
    assert result.backend == "onnxruntime"
    # Causal LMs with SDPA attention also get the KV-cache decoder (slmopt.backends.onnxrt.generation).
    generation = {
        "decoder": "decoder.onnx",
        "genai_config": "genai_config.json",
        "generation_meta": "slmopt_generation.json",
    }
    decoder = generation if name in CACHED else {}
    assert result.artifacts == {"onnx": "model.onnx", **decoder}
    assert not (tmp_path / "model.onnx.data").exists()

    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert model.ir_version <= MAX_IR_VERSION
    assert result.metadata["ir_version"] == model.ir_version
    opset = {o.domain: o.version for o in model.opset_import}[""]
    assert opset >= 18 and result.metadata["opset"] == opset
    assert [i.name for i in model.graph.input] == ["input_ids"]
    assert [o.name for o in model.graph.output] == [OUTPUT_NAME[ZOO[name][2]]]
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq"]
    assert result.metadata["max_abs_diff"] <= ORT_ATOL

    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    histogram = onnx_op_histogram(path)
    assert histogram == counts == result.metadata["op_histogram"]
    assert histogram.get("MatMul", 0) + histogram.get("Gemm", 0) >= _num_linears(build_model(name))

    engine = OnnxRuntimeBackend().load(tmp_path, threads=1)
    for shape in SHAPES:
        ids = _ids(name, shape)
        expected = program(ids)
        got = engine(ids)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= ORT_ATOL


def test_onnxruntime_module_kind_and_external_data(tmp_path: Path) -> None:
    block, (x,) = toy_block()
    info = ModelInfo(kind="module", source="t", input_names=["x"], dynamic_dims=[{0: "batch", 1: "seq"}])
    program = capture(block, (x,), info)
    result = OnnxRuntimeBackend().lower(program, tmp_path, {"external_data": True})
    assert result.artifacts == {"onnx": "model.onnx", "onnx_data": "model.onnx.data"}
    data = tmp_path / "model.onnx.data"
    # The matrices live outside the proto (the exporter keeps tiny vectors such as norm weights inline).
    weights = sum(p.numel() * 4 for p in block.parameters() if p.dim() == 2)
    assert data.stat().st_size >= weights
    assert (tmp_path / "model.onnx").stat().st_size < weights
    onnx.checker.check_model(str(tmp_path / "model.onnx"), full_check=True)
    proto = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert [o.name for o in proto.graph.output] == ["output"]

    engine = OnnxRuntimeBackend().load(tmp_path, threads=1)
    for b, s in SHAPES:
        inp = torch.randn(b, s, x.shape[-1], generator=torch.Generator().manual_seed(b))
        assert (engine(inp) - program(inp)).abs().max().item() <= ORT_ATOL
    # run_onnx by name, with numpy input
    inp = torch.randn(2, 5, x.shape[-1])
    assert (
        run_onnx(tmp_path / "model.onnx", {"x": inp.numpy()}) - program(inp)
    ).abs().max().item() <= ORT_ATOL


class _RotaryLike(nn.Module):
    """A grad-disabled helper inside forward, as HF's rotary embedding has (``@torch.no_grad``)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.proj = nn.Linear(16, 16)
        self.register_buffer(
            "inv_freq", 1.0 / (100 ** (torch.arange(0, 16, 2).float() / 16)), persistent=False
        )

    @torch.no_grad()
    def angles(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[1], dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq[None, :]
        return torch.cat([freqs, freqs], dim=-1).cos()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        return self.proj(h * self.angles(h).to(h.dtype))


def test_onnx_lowering_handles_grad_hop_without_touching_the_program(tmp_path: Path) -> None:
    # Exported with grad enabled, the no_grad region becomes a wrap_with_set_grad_enabled HOP.
    module = _RotaryLike().eval()
    ids = example_ids(vocab=32)
    dim = torch.export.Dim("seq", min=1, max=64)
    ep = torch.export.export(module, (ids,), dynamic_shapes=({1: dim},), strict=False)
    info = ModelInfo(kind="causal-lm", source="t", vocab_size=32, max_seq_len=64, dynamic_dims=[{1: "seq"}])
    program = Program(ep.module(), (ids,), info)

    def hops() -> list[str]:
        return [str(n.target) for n in program.graph.nodes if "wrap_with_set_grad_enabled" in str(n.target)]

    before = hops()
    assert before, "precondition: the Program holds the HOP"
    OnnxRuntimeBackend().lower(program, tmp_path, {})
    assert hops() == before
    engine = OnnxRuntimeBackend().load(tmp_path)
    for seq in (3, 40):
        x = example_ids(2, seq, vocab=32, seed=seq)
        assert (engine(x) - module(x)).abs().max().item() <= ORT_ATOL


# --------------------------------------------------------------------------------------------- helpers
def _tiny_onnx(path: Path) -> Path:
    """Two MatMuls and a Relu, plus a local function calling Relu once, hand-built with onnx.helper."""
    fn = helper.make_function(
        "local", "Act", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])], [helper.make_opsetid("", 18)]
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Act", ["h"], ["r"], domain="local"),
        helper.make_node("MatMul", ["r", "w"], ["y"]),
    ]
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 2], [1.0, -1.0, 0.5, 2.0])
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
        [w],
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("local", 1)]
    model = helper.make_model(graph, opset_imports=opsets, functions=[fn], ir_version=10)
    onnx.save(model, str(path))
    return path


def test_op_histogram_counts_function_bodies(tmp_path: Path) -> None:
    assert onnx_op_histogram(_tiny_onnx(tmp_path / "m.onnx")) == {"MatMul": 2, "Act": 1, "Relu": 1}


def test_run_onnx_and_engine_checks(tmp_path: Path) -> None:
    path = _tiny_onnx(tmp_path / "m.onnx")
    x = torch.tensor([[1.0, 2.0], [-3.0, 0.5]])
    w = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
    expected = torch.relu(x @ w) @ w
    assert torch.allclose(run_onnx(path, (x,)), expected)
    assert torch.allclose(run_onnx(path, {"x": x}), expected)
    with pytest.raises(ValueError, match="missing ONNX inputs"):
        run_onnx(path, {"z": x})
    engine = OnnxRuntimeEngine(make_session(path, threads=1))
    with pytest.raises(TypeError, match="takes 1 inputs"):
        engine(x, x)


def test_unavailable_provider_falls_back_to_cpu(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _tiny_onnx(tmp_path / "m.onnx")
    with caplog.at_level(logging.WARNING):
        session = make_session(path, threads=1, providers=["NoSuchExecutionProvider"])
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert "NoSuchExecutionProvider" in caplog.text


def test_bad_options_and_missing_files_are_user_errors(tmp_path: Path) -> None:
    info = ModelInfo(kind="module", source="t", input_names=["x"], dynamic_dims=[{0: "batch"}])
    program = capture(nn.Linear(4, 4), (torch.randn(2, 4),), info)
    with pytest.raises(ValueError, match="valid options"):
        OnnxRuntimeBackend().lower(program, tmp_path, {"opset_version": 18})
    with pytest.raises(ValueError, match="opset must be"):
        OnnxRuntimeBackend().lower(program, tmp_path, {"opset": 17})
    with pytest.raises(ValueError, match="model.onnx"):
        OnnxRuntimeBackend().load(tmp_path)
