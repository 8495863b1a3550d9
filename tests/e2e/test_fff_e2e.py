"""`slmopt compile --passes fff` end to end into ONNX Runtime, for each ONNX lowering and model family."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

import slmopt
from tests.helpers import save_token_ids
from tests.models import save_hf

# (model, lowering, parity tolerance). MoE's "gelu" is the tanh form (measured in tests/backends/test_onnx_fff.py),
# so erf-GELU leaves (BERT) lowered to MoE carry a stated ~1e-3 tolerance; everything else is exact math.
CASES = [
    ("llama", "moe", 1e-4),  # gated SiLU leaves -> MoE swiglu
    ("qwen2", "moe", 1e-4),
    ("gpt2", "moe", 1e-4),  # gelu_tanh leaves -> MoE gelu, same formula
    ("bert", "moe", 2e-3),  # erf GELU leaves approximated by MoE's tanh GELU
    ("llama", "ops", 1e-4),
    ("bert", "ops", 1e-4),
]


@pytest.fixture(scope="module")
def ids_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "ids.npy"
    save_token_ids(path, 8192)
    return path


@pytest.mark.parametrize(("name", "lowering", "tolerance"), CASES)
def test_fff_compiles_to_onnxruntime_within_parity(tmp_path, ids_file, name, lowering, tolerance):
    model_dir = save_hf(name, tmp_path / name)
    result = slmopt.compile(
        str(model_dir),
        passes=f"fff{{depth=1,distill_steps=0,lowering={lowering}}}",
        calib=str(ids_file),
        seq_len=32,
        num_samples=16,
        output_dir=tmp_path / "out",
        bench=False,
        progress=False,
    )
    report = result.report
    assert report.parity["max_abs_diff"] <= tolerance
    layers = report.passes[0]["metrics"]["layers"]
    assert len(layers) == 2 and all(row["depth"] == 1 and row["active_fraction"] == 0.5 for row in layers)
    model = onnx.load(tmp_path / "out" / "model.onnx")
    ops = [node.op_type for node in model.graph.node]
    if lowering == "moe":
        assert ops.count("MoE") == 2, "one com.microsoft.MoE node per converted FFN"
    else:
        assert "MoE" not in ops and all(node.domain in ("", "ai.onnx") for node in model.graph.node)
