"""``import slmopt``: defines ``torch.ops.slmopt.fff`` (a saved program.pt2 loads) and stays light.

Each check runs in a fresh interpreter, so nothing this test process imported can make it pass.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from slmopt.ops import fff

HEAVY = ("onnx", "onnxruntime", "onnxscript", "transformers", "onnxruntime_genai")


class _TreeFFN(torch.nn.Module):
    """A depth-1 FFF tree with one leaf FFN each side, called through the custom op."""

    def __init__(self, hidden: int = 8, leaf: int = 4) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.node_w = torch.nn.Parameter(torch.randn(1, hidden, generator=gen))
        self.node_b = torch.nn.Parameter(torch.zeros(1))
        self.w1 = torch.nn.Parameter(torch.randn(2, leaf, hidden, generator=gen))
        self.w2 = torch.nn.Parameter(torch.randn(2, leaf, hidden, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fff(x, self.node_w, self.node_b, leaf_w1=self.w1, leaf_w2=self.w2, activation="gelu")


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_slmopt_loads_fff_programs_and_stays_light(tmp_path: Path) -> None:
    module = _TreeFFN().eval()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    archive, inputs, expected = tmp_path / "program.pt2", tmp_path / "x.pt", tmp_path / "y.pt"
    torch.export.save(torch.export.export(module, (x,)), str(archive))
    torch.save(x, inputs)
    load = (
        f"import torch; ep = torch.export.load({str(archive)!r}); "
        f"torch.save(ep.module()(torch.load({str(inputs)!r})), {str(expected)!r})"
    )
    without = _run(load)
    assert without.returncode != 0 and "slmopt" in without.stderr  # plain torch cannot resolve the op
    heavy = f"print(sorted(m for m in {HEAVY!r} if m in sys.modules)); "
    done = _run("import sys, slmopt; " + heavy + load)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"  # nothing heavy was imported by `import slmopt`
    torch.testing.assert_close(torch.load(expected), module(x), rtol=0, atol=0)
