"""Build helpers for the native fff kernels (CPU extension, CUDA objects/PTX, host library).

Nothing here imports ``slmopt``: the core's ``slmopt.ops`` imports this module, never the reverse.
Builds are cached under ``$SLMOPT_CACHE`` (default ``~/.cache/slmopt``) in a folder named after the
Python/torch versions and the host CPU, because ``-march=native`` objects only run on that CPU.

Example:
    >>> from slmopt.native import build
    >>> so = build.load_cpu_extension()          # doctest: +SKIP  (compiles once, ~60 s on 2 cores)
    >>> build.compile_cuda("sm_90", Path("out"))  # doctest: +SKIP  (needs nvcc)
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = [
    "SOURCE_DIR",
    "cache_dir",
    "compile_cuda",
    "compile_emulated",
    "compile_emulator",
    "compile_host_library",
    "cxx_arch_flags",
    "find_nvcc",
    "load_cpu_extension",
    "load_cuda_extension",
    "nvcc_command",
]

SOURCE_DIR = Path(__file__).resolve().parent
_CPU_SOURCES = ("fff_cpu.cpp",)
_CPU_EXTENSION = "slmopt_fff_cpu"


def cache_dir() -> Path:
    """Root of slmopt's build cache: ``$SLMOPT_CACHE`` or ``~/.cache/slmopt``.

    Example:
        >>> cache_dir().name == "slmopt" or "SLMOPT_CACHE" in os.environ
        True
    """
    env = os.environ.get("SLMOPT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "slmopt"


@functools.cache
def cxx_arch_flags(compiler: str = "c++") -> tuple[str, ...]:
    """Host tuning flags the compiler accepts: ``-march=native`` (plus 512-bit vectors) or nothing.

    Args:
        compiler: C++ compiler to probe.

    Returns:
        Flags to append to the compile line; empty when the compiler rejects ``-march=native``.

    Example:
        >>> isinstance(cxx_arch_flags(), tuple)
        True
    """
    for flags in (("-march=native", "-mprefer-vector-width=512"), ("-march=native",)):
        try:
            probe = subprocess.run(
                [compiler, *flags, "-x", "c++", "-fsyntax-only", "-"],
                input="int main() { return 0; }\n",
                capture_output=True,
                text=True,
                timeout=60,
            )
        except (OSError, subprocess.SubprocessError):
            return ()
        if probe.returncode == 0:
            return flags
    return ()


def _cpu_signature() -> str:
    """Short hash of what ``-march=native`` means here (so a shared home never loads a foreign build)."""
    try:
        text = subprocess.run(
            ["c++", "-march=native", "-Q", "--help=target"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        text = platform.processor()
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def load_cpu_extension(verbose: bool = False) -> str:
    """Builds (once, cached) and loads the CPU kernel library, registering ``slmopt::fff``'s CPU kernel.

    The ``slmopt::fff`` schema must already be defined (``import slmopt.ops`` does it).

    Args:
        verbose: Print the compiler's output.

    Returns:
        Path of the loaded shared library.

    Raises:
        RuntimeError: the compiler or ninja failed (the message holds the build log).

    Example:
        >>> path = load_cpu_extension()  # doctest: +SKIP
    """
    import torch
    from torch.utils import cpp_extension

    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}_{_cpu_signature()}"
    build_dir = cache_dir() / "torch_extensions" / tag / _CPU_EXTENSION
    build_dir.mkdir(parents=True, exist_ok=True)
    # torch picks the C++ standard its headers need; -ffp-contract=fast restores FMA contraction that
    # ISO -std modes turn off.
    flags = ["-O3", "-ffp-contract=fast", *cxx_arch_flags()]
    path = cpp_extension.load(
        name=_CPU_EXTENSION,
        sources=[str(SOURCE_DIR / s) for s in _CPU_SOURCES],
        extra_cflags=flags,
        extra_include_paths=[str(SOURCE_DIR)],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=verbose,
    )
    return str(path)


def compile_host_library(out_dir: Path, compiler: str = "c++") -> Path:
    """Compiles fff_common.h's per-token functions for the host into a shared library (no torch).

    The library exports ``int slmopt_fff_host_forward_{f32,f16}(const SlmoptFffParams*)``; the tests call it
    through ctypes to check the CUDA kernels' per-token math on a machine without a GPU.

    Args:
        out_dir: Folder for the library.
        compiler: C++ compiler.

    Returns:
        Path of the shared library.

    Example:
        >>> lib = compile_host_library(Path("/tmp/fffhost"))  # doctest: +SKIP
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "libslmopt_fff_host.so"
    # The translation unit is just the header with its host API switched on (fed through stdin).
    cmd = [
        compiler,
        "-std=c++17",
        "-O2",
        "-shared",
        "-fPIC",
        f"-I{SOURCE_DIR}",
        "-x",
        "c++",
        "-",
        "-o",
        str(out),
    ]
    source = '#define SLMOPT_FFF_HOST_API\n#include "fff_common.h"\n'
    proc = subprocess.run(cmd, input=source, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"host build of fff_common.h failed:\n{proc.stderr}")
    return out


def compile_emulated(source: str, out: Path, compiler: str = "c++") -> Path:
    """Compiles CUDA kernel source for the host emulator (``fff_emu.h``) into a shared library.

    The source is compiled as C++ with ``fff_emu.h`` force-included, so ``__global__`` functions become host
    functions that ``slmopt_emu::launch`` runs thread by thread (see fff_emu.h for the model).

    Args:
        source: Translation unit text (it may include this folder's headers).
        out: Shared library to write.
        compiler: C++ compiler.

    Returns:
        ``out``.

    Raises:
        RuntimeError: the compiler failed (message holds its output).

    Example:
        >>> compile_emulated('#include "fff_token_kernel.cuh"', Path("/tmp/e.so"))  # doctest: +SKIP
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [compiler, "-std=c++17", "-O2", "-shared", "-fPIC", "-Wno-unknown-pragmas", f"-I{SOURCE_DIR}"]
    cmd += ["-include", str(SOURCE_DIR / "fff_emu.h"), "-x", "c++", "-", "-o", str(out)]
    proc = subprocess.run(cmd, input=source, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"host emulation build failed:\n{proc.stderr}")
    return out


def compile_emulator(out_dir: Path, compiler: str = "c++") -> Path:
    """Builds fff_emu.cpp: fff.cu's launch logic and kernels on the host emulator (no GPU, no torch).

    Exports ``slmopt_fff_emu_forward``, ``slmopt_fff_emu_workspace_size``, ``slmopt_fff_emu_configure`` and
    ``slmopt_fff_emu_log`` (see fff_emu.cpp); the tests drive them through ctypes.

    Example:
        >>> lib = compile_emulator(Path("/tmp/fffemu"))  # doctest: +SKIP
    """
    source = (SOURCE_DIR / "fff_emu.cpp").read_text()
    return compile_emulated(source, out_dir / "libslmopt_fff_emu.so", compiler)


def find_nvcc() -> str | None:
    """Path of nvcc (``$CUDA_HOME/bin`` first, then ``PATH``), or None.

    Example:
        >>> find_nvcc() is None or find_nvcc().endswith("nvcc")
        True
    """
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _sm(arch: str) -> str:
    digits = arch.lower().removeprefix("sm_").removeprefix("compute_")
    if not digits.isdigit():
        raise ValueError(f"arch must look like 'sm_80' or '90', got {arch!r}")
    return digits


def nvcc_command(arch: str, out: Path, ptx: bool = False, with_torch: bool = False) -> list[str]:
    """nvcc command line compiling fff.cu for one GPU architecture.

    Args:
        arch: ``"sm_80"``, ``"sm_90"`` or just ``"90"``.
        out: Output file (``.o`` object with SASS + PTX, or ``.ptx`` when ``ptx``).
        ptx: Emit PTX text instead of an object.
        with_torch: Define ``SLMOPT_WITH_TORCH`` (needs torch's include paths added by the caller).

    Returns:
        The argument list.

    Example:
        >>> nvcc_command("sm_80", Path("fff.o"))[-2:]
        ['-o', 'fff.o']
    """
    sm = _sm(arch)
    cmd = [find_nvcc() or "nvcc", "-std=c++17", "-O3", "-lineinfo", f"-I{SOURCE_DIR}"]
    if ptx:
        cmd += [f"-arch=compute_{sm}", "-ptx"]
    else:
        cmd += [f"--generate-code=arch=compute_{sm},code=[compute_{sm},sm_{sm}]", "-c", "-Xcompiler", "-fPIC"]
    if with_torch:
        cmd.append("-DSLMOPT_WITH_TORCH")
    return [*cmd, str(SOURCE_DIR / "fff.cu"), "-o", str(out)]


def compile_cuda(arch: str, out_dir: Path, ptx: bool = False) -> Path:
    """Compiles fff.cu (kernels + extern "C" launchers, no torch) for ``arch``.

    Args:
        arch: ``"sm_80"``, ``"sm_90"``, ...
        out_dir: Folder for the output.
        ptx: Produce PTX instead of an object file.

    Returns:
        The produced ``fff_sm<NN>.o`` / ``fff_sm<NN>.ptx``.

    Raises:
        FileNotFoundError: nvcc is not installed.
        RuntimeError: nvcc failed (message holds its output).

    Example:
        >>> compile_cuda("sm_90", Path("/tmp/fff"))  # doctest: +SKIP
    """
    if find_nvcc() is None:
        raise FileNotFoundError("nvcc not found: install the CUDA toolkit or set CUDA_HOME")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"fff_sm{_sm(arch)}.{'ptx' if ptx else 'o'}"
    proc = subprocess.run(nvcc_command(arch, out, ptx=ptx), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed for {arch}:\n{proc.stdout}\n{proc.stderr}")
    return out


def load_cuda_extension(verbose: bool = False) -> str:
    """Builds and loads fff.cu with torch (registers ``slmopt::fff``'s CUDA kernel); needs CUDA torch.

    Example:
        >>> load_cuda_extension()  # doctest: +SKIP
    """
    import torch
    from torch.utils import cpp_extension

    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}"
    build_dir = cache_dir() / "torch_extensions" / tag / "slmopt_fff_cuda"
    build_dir.mkdir(parents=True, exist_ok=True)
    path = cpp_extension.load(
        name="slmopt_fff_cuda",
        sources=[str(SOURCE_DIR / "fff.cu")],
        # No -std here: torch passes the C++ standard its headers need (as for the CPU extension).
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-DSLMOPT_WITH_TORCH"],
        extra_include_paths=[str(SOURCE_DIR)],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=verbose,
    )
    return str(path)
