"""Loading untrusted model files safely: no pickled code, no silent mismatch between config and weights.

* ``.pt2`` archives: :func:`safe_export_load` — ``torch.export.load`` with every unpickling forced to
  ``weights_only=True`` (plain torch falls back to full unpickling, which runs code).
* HF folders: :func:`check_safetensors` (headers readable), :func:`check_shapes_before_loading` (every
  tensor's shape against a meta-device instance of the config, before anything is allocated, so a config
  claiming a huge vocabulary cannot exhaust memory), :func:`check_loading_info` (nothing missing, re-shaped
  or left over after loading).

Example:
    >>> first_line(ValueError("one\ntwo"))
    'one'
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from slmopt.errors import UserError

__all__ = [
    "MAX_LAYERS",
    "UNSAFE_PICKLE",
    "check_loading_info",
    "check_safetensors",
    "check_shapes_before_loading",
    "first_line",
    "safe_export_load",
]

MAX_LAYERS = 4096  # a config asking for more layers is corrupt (building it would take minutes)
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")

UNSAFE_PICKLE = (
    "refusing to load {path}: it holds pickled objects other than tensors, which could run code "
    "(only weights_only pickles are read; use safetensors)"
)


def check_safetensors(files: list[Path]) -> None:
    from safetensors import SafetensorError, safe_open

    for f in files:
        try:
            with safe_open(str(f), "pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as err:
            raise UserError(f"corrupt safetensors file {f}: {err}") from None


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_loading_info(path: Path, info: dict[str, Any]) -> None:
    """Refuses a folder whose config.json does not describe its weights.

    transformers would otherwise random-initialise missing or mis-shaped weights (or drop extra layers)
    with only a warning: the compile would then "succeed" on a different model. Unexpected non-weight
    entries (legacy buffers such as ``attn.masked_bias`` or ``rotary_emb.inv_freq``) are harmless.
    """
    missing = list(info.get("missing_keys") or [])
    mismatched = [f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in info.get("mismatched_keys") or []]
    unexpected = [k for k in info.get("unexpected_keys") or [] if k.endswith(".weight")]
    problems = [
        (len(missing), "weights missing from the checkpoint", missing),
        (len(mismatched), "weights of another shape (checkpoint vs config)", mismatched),
        (len(unexpected), "checkpoint weights the config has no place for", unexpected),
    ]
    found = [f"{n} {what} (e.g. {', '.join(sorted(keys)[:2])})" for n, what, keys in problems if n]
    if found:
        raise UserError(f"config.json in {path} does not match its weights: {'; '.join(found)}")


def check_shapes_before_loading(path: Path, config: Any, auto: Any, weights: list[Path]) -> None:
    """Compares the safetensors' tensor shapes with a meta-device model built from ``config``.

    Runs before ``from_pretrained`` allocates anything: a config that does not describe the weights fails
    here with the names, instead of transformers allocating (and randomly initialising) config-shaped
    tensors — which for a corrupt ``vocab_size`` of 10^12 would exhaust memory.
    """
    from safetensors import safe_open

    for key in _LAYER_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not 0 <= value <= MAX_LAYERS:
            raise UserError(f"config.json in {path}: {key}={value} is out of range (0..{MAX_LAYERS})")
    try:
        with torch.device("meta"):
            model = auto.from_config(config)
    except Exception as err:  # noqa: BLE001 - any failure to build means the config is unusable
        raise UserError(f"config.json in {path} describes no buildable model: {first_line(err)}") from None
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found: dict[str, tuple[int, ...]] = {}
    for f in weights:
        with safe_open(str(f), "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                found[name] = tuple(handle.get_slice(name).get_shape())
    # Checkpoints name weights with or without the base-model prefix: compare on the longest match.
    wrong = []
    for name, shape in found.items():
        want = expected.get(name)
        if want is None:
            prefix = getattr(model, "base_model_prefix", "")
            want = expected.get(f"{prefix}.{name}") or expected.get(name.removeprefix(f"{prefix}."))
        if want is not None and want != shape:
            wrong.append(f"{name} {shape} vs {want}")
    if wrong:
        raise UserError(
            f"config.json in {path} does not match its weights: {len(wrong)} weights of another shape "
            f"(checkpoint vs config) (e.g. {', '.join(sorted(wrong)[:2])})"
        )


class _RefusedPickle(pickle.UnpicklingError):
    """Raised instead of unpickling an arbitrary object from a file we do not trust."""


def _refuse_pickle(*args: Any, **kwargs: Any) -> Any:
    raise _RefusedPickle("arbitrary pickled objects are not loaded")


@contextmanager
def _weights_only_loading() -> Iterator[None]:
    """While active, ``torch.load`` is forced to ``weights_only=True`` and raw unpickling is refused.

    ``torch.export.load`` (torch 2.13) reads sample inputs and pickled weights with ``torch.load``, falling
    back to ``weights_only=False`` when the safe load fails, and reads opaque/custom constants with
    ``pickle.loads``: a crafted ``.pt2`` runs code on load. Patching for the duration of the call is the
    only hook torch offers; the CLI loads models from one thread, so nothing else sees the patch.
    """
    from torch.export.pt2_archive import _package

    real_load, real_pickle, real_obj = torch.load, _package.pickle, torch._C._pickle_load_obj

    def weights_only_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    shim = type(
        "_NoPickle", (), {"loads": staticmethod(_refuse_pickle), "load": staticmethod(_refuse_pickle)}
    )
    torch.load, _package.pickle, torch._C._pickle_load_obj = weights_only_load, shim, _refuse_pickle
    try:
        yield
    finally:
        torch.load, _package.pickle, torch._C._pickle_load_obj = real_load, real_pickle, real_obj


def safe_export_load(path: str | Path) -> torch.export.ExportedProgram:
    """``torch.export.load`` that never executes pickled code (see :func:`_weights_only_loading`).

    Raises:
        UserError: the archive holds pickled objects other than tensors, or is not a valid ``.pt2``.

    Example:
        >>> # ep = safe_export_load("model.pt2")
    """
    try:
        with _weights_only_loading():
            return torch.export.load(str(path))
    except pickle.UnpicklingError:
        raise UserError(UNSAFE_PICKLE.format(path=path)) from None
    except Exception as err:  # noqa: BLE001 - any failure here means "not a valid .pt2"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path} is not a loadable torch.export program: {first}") from None
