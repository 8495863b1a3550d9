"""Generation: sampling filters vs a NumPy reference, seeded determinism, EOS, streaming, CLI end to end."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from slmopt.cli import main
from slmopt.errors import UserError
from slmopt.generation.generate import Generator, Sampling, TorchDecoder, filter_logits, sample_next
from slmopt.generation.kv_cache import add_kv_cache
from tests.core.test_kv_cache import gpt2_untied
from tests.models import capture_model, save_hf

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_filter(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Allowed-token probabilities, written plainly: scale, keep top-k, keep the smallest top-p prefix."""
    out = np.zeros_like(logits)
    for row, z in enumerate(logits / temperature):
        allowed = set(range(len(z)))
        if top_k:
            kth = sorted(z, reverse=True)[top_k - 1]
            allowed = {i for i in allowed if z[i] >= kth}
        if top_p < 1:
            p = np.exp(z - z.max()) * np.isin(np.arange(len(z)), list(allowed))
            p = p / p.sum()
            kept, mass = set(), 0.0
            for i in sorted(allowed, key=lambda i: -p[i]):
                kept.add(i)
                mass += p[i]
                if mass >= top_p:
                    break
            allowed = kept
        e = np.array([np.exp(z[i] - z.max()) if i in allowed else 0.0 for i in range(len(z))])
        out[row] = e / e.sum()
    return out


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (1.0, 8, 0.5)]
)
def test_filter_logits_matches_reference(temperature: float, top_k: int, top_p: float) -> None:
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(0)) * 2
    got = torch.softmax(filter_logits(logits, temperature, top_k, top_p), -1).numpy()
    np.testing.assert_allclose(
        got, _reference_filter(logits.double().numpy(), temperature, top_k, top_p), atol=1e-6
    )


def test_sampled_frequencies_follow_the_filtered_distribution() -> None:
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0]]).expand(4000, -1)
    sampling = Sampling(do_sample=True, temperature=0.9, top_k=4, top_p=0.9, seed=3)
    draws = sample_next(logits, sampling, torch.Generator().manual_seed(3))
    freq = np.bincount(draws.numpy(), minlength=6) / 4000
    ref = _reference_filter(logits[:1].double().numpy(), 0.9, 4, 0.9)[0]
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(ref))
    np.testing.assert_allclose(freq, ref, atol=0.03)


class _Scripted:
    """A fake decoder whose next-token logits follow a script (one-hot on the scripted token)."""

    def __init__(self, script: list[int], vocab: int = 256) -> None:
        self.script, self.vocab, self.calls = script, vocab, 0

    def empty_past(self, batch: int) -> list[torch.Tensor]:
        return []

    def __call__(self, ids: torch.Tensor, past: list) -> tuple[torch.Tensor, list]:
        logits = torch.zeros(ids.shape[0], ids.shape[1], self.vocab)
        logits[:, -1, self.script[min(self.calls, len(self.script) - 1)]] = 10.0
        self.calls += 1
        return logits, past


def test_eos_stops_and_streaming_waits_for_whole_characters() -> None:
    gen = Generator(_Scripted([7, 3, 9]), eos_token_id=3)
    assert gen.generate([1, 2], max_new_tokens=10).tolist() == [[1, 2, 7, 3]]
    assert gen.decoder.calls == 2  # the EOS step is not fed back
    text = "é!"  # é is two UTF-8 bytes: nothing may be printed between them
    pieces = list(Generator(_Scripted(list(text.encode())), tokenizer="bytes").stream_text("a", 3))
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)


@functools.cache
def _gpt2_decoder() -> TorchDecoder:
    return TorchDecoder(*add_kv_cache(capture_model("gpt2")))


def test_same_seed_same_tokens() -> None:
    gen = Generator(_gpt2_decoder(), max_seq_len=64)
    prompt = [[5, 17, 42, 8]]

    def run(seed: int) -> list[int]:
        return gen.generate(prompt, 24, Sampling(do_sample=True, top_k=50, top_p=0.95, seed=seed))[0].tolist()

    assert run(1) == run(1)
    assert run(1) != run(2)
    with pytest.raises(UserError, match="context of 64"):
        gen.generate(prompt, 61)
    with pytest.raises(UserError, match="empty"):
        gen.generate([[]], 4)


# --------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gen")
    folders = {}
    for name in ("gpt2", "bert"):
        model_dir = root / f"{name}-model"
        if name == "gpt2":
            gpt2_untied().save_pretrained(model_dir)
        else:
            save_hf(name, model_dir)
        assert (
            main(["compile", str(model_dir), "-o", str(root / name), "--no-bench", "-q", "--no-progress"])
            == 0
        )
        folders[name], folders[f"{name}-model"] = root / name, model_dir
    return folders


def _hf_greedy(ids: list[int], n: int, eos: int) -> list[int]:
    model, out = gpt2_untied(), list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out]), use_cache=False).logits[0, -1].argmax()))
            if out[-1] == eos:
                break
    return out[len(ids) :]


def test_cli_generate_from_engine_and_from_model_match_hf(engines, capsys) -> None:
    manifest = json.loads((engines["gpt2"] / "slmopt.json").read_text())
    assert {"decoder", "genai_config"} <= set(manifest["artifacts"])  # on by default for causal LMs
    expected = _hf_greedy([5, 17, 42], 12, eos=127)
    assert len(expected) == 12 and len(set(expected)) >= 6  # a real continuation, not a repeat
    for target in (engines["gpt2"], engines["gpt2-model"]):  # ONNX decoder; captured model in torch
        assert main(["generate", str(target), "--input-ids", "5,17,42", "--max-new-tokens", "12"]) == 0
        assert capsys.readouterr().out.strip() == ",".join(map(str, expected))


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--prompt", ""], "prompt is empty"),
        (["--input-ids", ","], "--input-ids is empty"),
        (["--input-ids", "1,x"], "comma-separated integers"),
        (["--input-ids", "1,2", "--max-new-tokens", "63"], "exceeds the model's context of 64"),
        (["--prompt", "hi"], "no tokenizer"),
        (["--input-ids", "1,500"], "token ids must be in [0, 128)"),
        (["--input-ids", "1", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(engines, capsys, args: list[str], needle: str) -> None:
    code = main(["generate", str(engines["gpt2"]), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err


def test_cli_non_lm_engine_is_refused(engines, capsys) -> None:
    assert not (engines["bert"] / "decoder.onnx").exists()
    code = main(["generate", str(engines["bert"]), "--input-ids", "1,2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not a generation engine" in err[0], err


def test_generation_bench_reports_prefill_decode_and_kv_bytes(engines, capsys) -> None:
    from slmopt.generation.bench import bench_generation

    folder = engines["gpt2"]
    result = bench_generation(folder, folder, prompt_lengths=(8, 100), batches=(1, 2), context=16, reps=2,
                              progress=False)  # fmt: skip
    assert [(r["metric"], r["setting"]) for r in result.rows] == [
        ("prefill", "prompt 8"),
        ("decode", "batch 1, context 16"),
        ("decode", "batch 2, context 16"),
    ]
    assert result.notes == ["prefill 100 skipped: beyond the model's context of 64"]
    assert result.kv_bytes_per_token == {"original": 2 * 2 * 4 * 12 * 4, "compiled": 2 * 2 * 4 * 12 * 4}
    prefill = result.rows[0]["original"]
    assert prefill["tokens_per_s"] == pytest.approx(8 / prefill["median_ms"] * 1e3)
    code = main(["bench", str(folder), str(folder), "--generation", "--prompt-lengths", "8", "--decode-batches",
                 "1", "--context", "8", "--reps", "2", "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "prompt 8" in out and "kv bytes/token" in out
