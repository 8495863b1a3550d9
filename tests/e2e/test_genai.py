"""The output folder in the real ONNX Runtime GenAI client: loads, greedy-generates the ids of `slmopt generate`.

Drives ``onnxruntime_genai`` itself (``og.Model``, ``og.Generator``, ``og.Tokenizer``): its strict
``genai_config.json`` parser is the judge of the file, not a reader written here. The model is tinylm's
architecture and byte tokenizer exactly as ``make demo`` builds it (``bos/eos/pad`` all None), random-init
with a larger init range so greedy decoding does not collapse into a repeat.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from slmopt.cli import main

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is in the dev extra")

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = Path(__file__).resolve().parents[2] / "examples" / "tinylm" / "train.py"
PROMPT = [100, 101, 102, 32, 109, 97, 105, 110, 40]  # "def main(" as bytes
NEW_TOKENS = 24
# The GenAI 0.18 schema keys slmopt writes; its parser rejects any other with "Unknown value".
MODEL_KEYS = {
    "type",
    "context_length",
    "vocab_size",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "decoder",
}


def _train_module() -> ModuleType:
    """examples/tinylm/train.py (not a package): its ``model_config`` and ``build_tokenizer``."""
    if "tinylm_train" in sys.modules:
        return sys.modules["tinylm_train"]
    spec = importlib.util.spec_from_file_location("tinylm_train", TRAIN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the class body runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tinylm-shaped model folder and its compiled outputs: plain, and after ``prune-attn,fff``."""
    from transformers import LlamaForCausalLM

    tl = _train_module()
    root = tmp_path_factory.mktemp("genai")
    config = tl.model_config()
    config.initializer_range = 0.1  # the default 0.02 gives near-flat logits (ties, repeats)
    torch.manual_seed(3)
    LlamaForCausalLM(config).eval().save_pretrained(root / "model")
    tl.build_tokenizer().save_pretrained(root / "model")
    (root / "calib.txt").write_text("def main(argv):\n    return len(argv) + 1\n" * 40)
    common = ["--no-bench", "-q", "--no-progress"]
    assert main(["compile", str(root / "model"), "-o", str(root / "plain"), *common]) == 0
    passes = "prune-attn{layers=1},fff{depth=1,distill_steps=0}"
    args = ["--passes", passes, "--calib", str(root / "calib.txt"), "--seq-len", "64"]
    assert main(["compile", str(root / "model"), "-o", str(root / "pruned"), *args, *common]) == 0
    return {"model": root / "model", "plain": root / "plain", "pruned": root / "pruned"}


def _genai_greedy(folder: Path, prompt: list[int], new_tokens: int) -> list[int]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)]


def _slmopt_generate(folder: Path, capsys: pytest.CaptureFixture[str]) -> list[int]:
    ids = ",".join(map(str, PROMPT))
    code = main(
        ["generate", str(folder), "--input-ids", ids, "--max-new-tokens", str(NEW_TOKENS), "--print-ids"]
    )
    assert code == 0
    return [int(t) for t in capsys.readouterr().out.strip().split(",")]


@pytest.mark.parametrize("name", ["plain", "pruned"])
def test_genai_client_generates_the_ids_of_slmopt_generate(folders, capsys, name: str) -> None:
    folder = folders[name]
    expected = _slmopt_generate(folder, capsys)
    assert len(expected) == NEW_TOKENS and len(set(expected)) >= 6  # a real continuation, not a repeat
    # The model has no EOS; genai_config.json names token 0 as a placeholder, so it must not occur here.
    assert 0 not in expected
    got = _genai_greedy(folder, PROMPT, NEW_TOKENS)
    assert got == PROMPT + expected


def test_pruned_folder_really_is_transformed(folders) -> None:
    meta = json.loads((folders["pruned"] / "slmopt_generation.json").read_text())
    assert [s["block"] for s in meta["slots"]] == [0, 2, 3]  # block 1's attention removed: no cache slot
    report = json.loads((folders["pruned"] / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["prune-attn", "fff"]


@pytest.mark.parametrize("name", ["plain", "pruned"])
def test_genai_config_is_the_client_schema_and_tokenizer_sits_beside_it(folders, name: str) -> None:
    folder = folders[name]
    config = json.loads((folder / "genai_config.json").read_text())
    assert set(config) == {"model", "search"} and set(config["model"]) == MODEL_KEYS
    assert config["model"]["type"] == "decoder"
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert config["model"][key] == 0  # tinylm defines none: the placeholder
    meta = json.loads((folder / "slmopt_generation.json").read_text())
    assert meta["special_tokens"] == {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    assert set(meta["genai_placeholders"]) == {"bos_token_id", "eos_token_id", "pad_token_id"}
    assert meta["genai_incompatible"] is None
    assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()
    tokenizer = og.Tokenizer(og.Model(str(folder)))
    text = "héllo"
    assert [int(t) for t in tokenizer.encode(text)] == list(text.encode())
    assert tokenizer.decode(list(text.encode())) == text


def test_layers_with_different_kv_shapes_are_flagged_for_genai() -> None:
    from slmopt.backends.onnxrt.generation import genai_incompatibility
    from slmopt.generation.kv_cache import CacheLayout, CacheSlot

    def layout(*kv_heads: int) -> CacheLayout:
        slots = [CacheSlot(i, i, f"sdpa_{i}", 4, h, 16) for i, h in enumerate(kv_heads)]
        return CacheLayout(slots, dtype="float32", vocab_size=256, max_seq_len=64)

    assert genai_incompatibility(layout(2, 2, 2)) is None
    assert "different KV heads" in genai_incompatibility(layout(2, 1, 2))


def test_a_folder_without_slmopt_generation_json_is_one_line(folders, tmp_path: Path, capsys) -> None:
    old = tmp_path / "old"
    shutil.copytree(folders["plain"], old)
    (old / "slmopt_generation.json").unlink()  # as written before the metadata had a file of its own
    code = main(["generate", str(old), "--input-ids", "1,2", "--max-new-tokens", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no slmopt_generation.json" in err[0], err
