"""Tests for slmopt.backends.onnxrt.check: the N:M checker on saved ONNX files."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from slmopt.backends.onnxrt.check import check_nm_onnx, normalize_name

IR_VERSION = 10  # ORT 1.31 loads up to 13; onnx 1.23 writes 14 by default


def two_four(rows: int, cols: int, axis: int, seed: int = 0) -> np.ndarray:
    """A random weight that is 2:4 along ``axis`` (built with NumPy only, independent of slmopt)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    moved = np.moveaxis(w, axis, -1).copy()
    groups = moved.reshape(*moved.shape[:-1], -1, 4)
    drop = np.argsort(np.abs(groups), axis=-1)[..., :2]
    np.put_along_axis(groups, drop, 0.0, axis=-1)
    return np.moveaxis(groups.reshape(moved.shape), -1, axis)


def gemm_model(weight: np.ndarray, trans_b: int, name: str = "fc.weight") -> onnx.ModelProto:
    k = weight.shape[1] if trans_b else weight.shape[0]
    n = weight.shape[0] if trans_b else weight.shape[1]
    node = helper.make_node("Gemm", ["x", name], ["y"], transB=trans_b, name="gemm")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
        [numpy_helper.from_array(weight, name)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)


def matmul_model(init: np.ndarray, via: list[onnx.NodeProto], k: int, n: int) -> onnx.ModelProto:
    """x @ B where B is produced from initializer ``w`` by the ``via`` nodes (ending in output "b")."""
    nodes = [*via, helper.make_node("MatMul", ["x", "b" if via else "w"], ["y"], name="mm")]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
        [numpy_helper.from_array(init, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)


def run_ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


# ----------------------------------------------------------------------------------- hand-built
def test_gemm_trans_b_checks_axis_one() -> None:
    w = two_four(8, 16, axis=1)  # [out, in], 2:4 along in
    model = gemm_model(w, trans_b=1)
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    np.testing.assert_allclose(run_ort(model, x), x @ w.T, rtol=1e-5, atol=1e-5)  # ORT agrees on layout
    report = check_nm_onnx(model, names=["fc.weight"])
    (row,) = report.rows
    assert (row.op, row.axis, row.valid_fraction, row.zero_fraction) == ("Gemm", 1, 1.0, 0.5)
    assert report.passed()


def test_wrong_axis_fails_even_though_it_reads_069() -> None:
    w = two_four(64, 64, axis=1)
    # The same [out, in] tensor declared as Gemm transB=0 means [in, out]: reduction along axis 0.
    report = check_nm_onnx(gemm_model(w, trans_b=0), names=["fc.weight"])
    (row,) = report.rows
    assert row.axis == 0
    assert 0.55 < row.valid_fraction < 0.85  # looks "mostly sparse"
    assert not report.passed()
    assert "valid" in row.note


def test_matmul_initializer_through_transpose_and_cast() -> None:
    w = two_four(8, 16, axis=1)  # stored [out, in]
    # fp16 [out, in] -> Cast -> Transpose -> MatMul B: the reduction axis maps back to axis 1.
    via = [
        helper.make_node("Cast", ["w"], ["w32"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["w32"], ["b"], perm=[1, 0]),
    ]
    model = matmul_model(w.astype(np.float16), via, 16, 8)
    x = np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)
    np.testing.assert_allclose(
        run_ort(model, x), x @ w.astype(np.float16).astype(np.float32).T, rtol=1e-3, atol=1e-3
    )
    report = check_nm_onnx(model, names=["w"])
    assert [(r.name, r.axis) for r in report.rows] == [("w", 1)]
    assert report.passed()
    # Plain MatMul with an [in, out] initializer: axis 0.
    direct = check_nm_onnx(matmul_model(np.ascontiguousarray(w.T), [], 16, 8), names=["w"])
    assert direct.rows[0].axis == 0 and direct.passed()
    # Transposing a weight that is 2:4 along its axis 0 moves the groups onto the wrong axis: fails.
    transpose = helper.make_node("Transpose", ["w"], ["b"], perm=[1, 0])
    wrong = check_nm_onnx(matmul_model(np.ascontiguousarray(w.T), [transpose], 8, 16), names=["w"])
    assert wrong.rows[0].axis == 1 and not wrong.passed()


def test_negative_zero_fails() -> None:
    w = two_four(8, 16, axis=1)
    w[w == 0] = -0.0
    report = check_nm_onnx(gemm_model(w, trans_b=1), names=["fc.weight"])
    assert report.rows[0].valid_fraction == 1.0
    assert report.rows[0].negative_zeros == w.size // 2
    assert not report.passed()


def test_auto_selection_and_missing_names() -> None:
    dense = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    auto_dense = check_nm_onnx(gemm_model(dense, trans_b=1))
    assert not auto_dense.rows[0].expected
    assert not auto_dense.passed()  # nothing N:M-looking in the file: not a pass
    assert check_nm_onnx(gemm_model(two_four(8, 16, axis=1), trans_b=1)).passed()
    missing = check_nm_onnx(gemm_model(two_four(8, 16, axis=1), trans_b=1), names=["other.weight"])
    assert missing.missing == ["other.weight"] and not missing.passed()
    assert missing.passed(["fc.weight"])  # re-selecting by name


def test_external_data(tmp_path: Path) -> None:
    model = gemm_model(two_four(8, 16, axis=1), trans_b=1)
    path = tmp_path / "m.onnx"
    onnx.save(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="m.data",
        size_threshold=0,
    )
    assert (tmp_path / "m.data").exists()
    assert check_nm_onnx(path, names=["fc.weight"]).passed()


def reference_counts(w: np.ndarray, axis: int) -> tuple[float, float, int]:
    """(valid 2:4 fraction along ``axis``, zero fraction, -0.0 count): plain NumPy."""
    groups = np.moveaxis(w, axis, -1).reshape(-1, 4)
    valid = float(((groups != 0).sum(-1) <= 2).mean())
    return valid, float((w == 0).mean()), int((np.signbit(w) & (w == 0)).sum())


@pytest.mark.parametrize("block_bytes", [64, 1 << 24])  # 64 B: every block is a couple of rows
def test_external_data_read_in_blocks_matches_whole_tensor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block_bytes: int
) -> None:
    import slmopt.backends.onnxrt.blocks as onnx_blocks

    monkeypatch.setattr(onnx_blocks, "BLOCK_BYTES", block_bytes)
    # Two weights in one data file (the second at a non-zero offset), 2:4 along different axes, with
    # broken groups and -0.0 planted in the middle and at the end of each tensor.
    first, second = two_four(12, 16, axis=1, seed=1), two_four(24, 8, axis=0, seed=2)
    first[5, 4:8], first[11, 12:16] = 1.0, 1.0
    second[8:12, 3], second[20:24, 7] = 2.0, 2.0
    first[first == 0] = np.where(np.arange(int((first == 0).sum())) % 3 == 0, -0.0, 0.0)
    nodes = [
        helper.make_node("Gemm", ["x", "fc1.weight"], ["h"], transB=1, name="gemm"),
        helper.make_node("MatMul", ["h", "fc2.weight"], ["y"], name="mm"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 8])],
        [numpy_helper.from_array(first, "fc1.weight"), numpy_helper.from_array(second, "fc2.weight")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="m.data", size_threshold=0)
    offsets = [
        dict((e.key, e.value) for e in t.external_data).get("offset", "0")
        for t in onnx.load(str(path), load_external_data=False).graph.initializer
    ]
    assert any(int(o) > 0 for o in offsets)  # the second weight really sits at an offset
    rows = {r.name: r for r in check_nm_onnx(path, names=["fc1.weight", "fc2.weight"]).rows}
    for name, weight, axis in (("fc1.weight", first, 1), ("fc2.weight", second, 0)):
        valid, zeros, negative = reference_counts(weight, axis)
        assert rows[name].axis == axis
        assert rows[name].valid_fraction == pytest.approx(valid)
        assert rows[name].zero_fraction == pytest.approx(zeros)
        assert rows[name].negative_zeros == negative
        assert rows[name].valid_fraction < 1.0


def test_truncated_external_data_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    model = gemm_model(two_four(8, 16, axis=1), trans_b=1)
    onnx.save(model, str(path), save_as_external_data=True, location="m.data", size_threshold=0)
    data = (tmp_path / "m.data").read_bytes()
    (tmp_path / "m.data").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        check_nm_onnx(path, names=["fc.weight"])


def test_normalize_name() -> None:
    assert normalize_name("p_model_model_layers_0_mlp_up_proj_weight") == normalize_name(
        "model.model.layers.0.mlp.up_proj.weight"
    )
    assert normalize_name("b_model.rotary.inv_freq") == "model_rotary_inv_freq"


# ----------------------------------------------------------------------------------- torch export
class _Conv1D(nn.Module):
    """GPT-2 style: weight stored [in, out], computed with addmm."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], -1)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(16, 32), nn.Linear(32, 16)])
        self.conv = _Conv1D(16, 24)
        self.head = nn.Linear(24, 8)  # left dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.layers[0](x))
        return self.head(torch.relu(self.conv(self.layers[1](x))))


def _masked_net() -> _Net:
    torch.manual_seed(0)
    net = _Net().eval()
    with torch.no_grad():
        for lin in net.layers:
            lin.weight.copy_(torch.from_numpy(two_four(*lin.weight.shape, axis=1)))
        net.conv.weight.copy_(torch.from_numpy(two_four(*net.conv.weight.shape, axis=0)))
    return net


MASKED = ["layers.0.weight", "layers.1.weight", "conv.weight"]


def _export(module: nn.Module, x: torch.Tensor, path: Path, **kw) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), dynamo=True, verbose=False, **kw)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("onnx")
    net, x = _masked_net(), torch.randn(2, 5, 16)
    return {
        "optimized": _export(net, x, tmp / "opt.onnx"),
        "plain": _export(net, x, tmp / "plain.onnx", optimize=False),
    }


@pytest.mark.parametrize("variant", ["optimized", "plain"])
def test_dynamo_export_linear_and_addmm(exported: dict[str, Path], variant: str) -> None:
    report = check_nm_onnx(exported[variant], names=MASKED)
    assert report.passed(), report.table()
    expected = {r.sources[0]: r for r in report.rows if r.expected}
    assert set(expected) == set(MASKED)
    assert expected["conv.weight"].op == "Gemm" and expected["conv.weight"].axis == 0
    assert all(r.valid_fraction == 1.0 for r in expected.values())
    head = [r for r in report.rows if "head.weight" in r.sources]
    assert len(head) == 1 and not head[0].expected and head[0].valid_fraction < 1.0
    # Without names, the sparse-looking weights are selected automatically.
    auto = check_nm_onnx(exported[variant])
    assert {r.sources[0] for r in auto.rows if r.expected} == set(MASKED) and auto.passed()
    # Asking for the dense head as well fails.
    assert not report.passed([*MASKED, "head.weight"])


def test_dynamo_export_names_from_exported_program_and_prefixes(exported: dict[str, Path]) -> None:
    # Names with torch.export placeholder style and an extra wrapper prefix still match.
    report = check_nm_onnx(
        exported["optimized"], names=["p_layers_0_weight", "model.layers.1.weight", "conv.weight"]
    )
    assert report.passed(), report.table()


def test_masked_llama_program_exported_to_onnx(tmp_path: Path) -> None:
    """End to end: mask-2to4 on a captured Llama, dynamo ONNX export of the Program, check by target."""
    from tests.helpers import captured, run_pipeline
    from tests.models import example_ids

    _, new, reports = run_pipeline(captured("llama"), "mask-2to4{method=magnitude}")
    targets = [row["name"] for row in reports[0].metrics["layers"]]
    path = _export(new.graph_module, new.example_inputs[0], tmp_path / "llama.onnx")
    report = check_nm_onnx(path, names=targets)
    assert report.passed(), report.table()
    assert sum(r.expected for r in report.rows) == len(targets) == 14
    head = [r for r in report.rows if "model.lm_head.weight" in r.sources]
    assert len(head) == 1 and not head[0].expected
    # And ORT runs the sparse model like the Program does.
    ids = example_ids(batch=2, seq=16, seed=4)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})
    np.testing.assert_allclose(logits, new(ids).numpy(), rtol=1e-4, atol=1e-4)
