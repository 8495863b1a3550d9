"""Program: capture never touches the user's model, clone independence, dead-code + dead-weight removal."""

from __future__ import annotations

import torch

from slmopt.analysis.analyze import analyze
from tests.models import build_model, capture_model


def test_capture_copies_parameters_and_clone_is_independent():
    program = capture_model("llama")
    clone = program.clone()
    target = next(n.target for n in clone.graph.nodes if n.op == "get_attr")
    clone.param(target).data.zero_()
    assert program.param(target).abs().sum() > 0


def test_dead_attention_branch_and_its_weights_are_removed():
    """GPT-2 has eval-mode dropout and SDPA nodes, which FX's default DCE keeps as 'maybe random'."""
    program = capture_model("gpt2")
    attention = analyze(program).blocks[0].attention
    nodes = {n.name: n for n in program.graph.nodes}
    nodes[attention.residual_add].replace_all_uses_with(nodes[attention.residual])
    program.recompile()
    names = [name for name, _ in program.graph_module.named_parameters()]
    assert not any(".h.0.attn." in name for name in names), names
    assert any(".h.1.attn." in name for name in names)
    sdpa = [n for n in program.graph.nodes if n.target == torch.ops.aten.scaled_dot_product_attention.default]
    assert len(sdpa) == 1  # only block 1's attention is left
    # Independent reference: the HF model with block 0's attention output zeroed by a hook.
    model = build_model("gpt2").eval()
    model.transformer.h[0].attn.register_forward_hook(lambda m, i, o: (torch.zeros_like(o[0]), *o[1:]))
    ids = torch.randint(0, 128, (3, 9))
    expected = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(program(ids), expected, atol=1e-5, rtol=1e-5)
