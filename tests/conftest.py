"""Shared pytest setup: hardware markers that skip with a reason, seeding, and captured zoo programs.

Keep this file generic: fixtures any test module may want. Captured programs are made once per session;
tests that change a program must work on ``zoo.fresh(name)`` (a ``.clone()``), never on ``zoo[name]``.
"""

from __future__ import annotations

import functools
import importlib
import shutil
from collections.abc import Iterator

import pytest
import torch

from slmopt.program import Program
from tests.helpers import captured
from tests.models import ZOO


@functools.cache
def _has_cuda() -> bool:
    return torch.cuda.is_available()


@functools.cache
def _tensorrt_problem() -> str | None:
    """Why TensorRT tests cannot run here, or None when they can."""
    try:
        importlib.import_module("tensorrt")
    except Exception as exc:  # a broken install raises more than ImportError (missing CUDA libraries)
        return f"the 'tensorrt' Python package is not importable ({type(exc).__name__}: {exc})"
    return None if _has_cuda() else "TensorRT needs a CUDA GPU and there is none on this machine"


# marker -> () -> skip reason, or None when the test can run
_MARKER_CHECKS = {
    "gpu": lambda: None if _has_cuda() else "no CUDA GPU on this machine",
    "tensorrt": _tensorrt_problem,
    "cuda_build": lambda: None if shutil.which("nvcc") else "nvcc (CUDA toolkit) is not on PATH",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skips tests marked ``gpu`` / ``tensorrt`` / ``cuda_build`` when the hardware or tool is missing."""
    for item in items:
        for marker, check in _MARKER_CHECKS.items():
            if item.get_closest_marker(marker) is None:
                continue
            reason = check()
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=reason))
                break


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    The test machines are shared: a single thread avoids oversubscription stalls in compile-heavy modules.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> Iterator[None]:
    """Every test starts from the same RNG state, whatever ran before it."""
    torch.manual_seed(0)
    yield


class ZooPrograms:
    """Lazily captured zoo programs, one capture per model per session.

    ``zoo[name]`` is the shared Program: read it, never modify it. ``zoo.fresh(name)`` is a private clone.
    """

    def __getitem__(self, name: str) -> Program:
        if name not in ZOO:
            raise KeyError(f"unknown zoo model {name!r}; choose one of {', '.join(ZOO)}")
        return captured(name)  # the same session cache as tests.helpers

    def fresh(self, name: str) -> Program:
        return self[name].clone()


@pytest.fixture(scope="session")
def zoo() -> ZooPrograms:
    """Session cache of captured zoo programs (see :class:`ZooPrograms`)."""
    return ZooPrograms()
