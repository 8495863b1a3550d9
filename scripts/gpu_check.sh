#!/usr/bin/env bash
# One command for a machine with a CUDA GPU and nvcc (no network needed): install slmopt in place, build
# fff.cu for this GPU, run the gpu/cuda_build tests, then print the op-level benchmark table.
#   bash scripts/gpu_check.sh            (or: make gpu-check)
# Logs and JSON go to $OUT (default ./gpu_check_out). Exit status: nonzero if the install, a build or a
# test failed; the benchmark still runs after test failures (its own failure is reported too).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export SLMOPT_CACHE="${SLMOPT_CACHE:-/tmp/slmopt-gpu-check-cache}"
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-}"
failed=()
t0=$SECONDS
step() { echo; echo "=== [$((SECONDS - t0)) s] $*"; }

step "machine"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
  nvcc --version | tail -2
  "$PY" -c 'import sys, torch, numpy; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "numpy", numpy.__version__, "gpu", torch.cuda.is_available())'
} 2>&1 | tee "$OUT/machine.txt"
# This GPU's SM, from torch (the image may preset TORCH_CUDA_ARCH_LIST, e.g. to "9.0a"; that stays as given
# for torch's extension build, while our own nvcc checks use the plain sm_XY).
ARCH="sm_$("$PY" -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo 90)"
if [ -z "$TORCH_CUDA_ARCH_LIST" ]; then
  TORCH_CUDA_ARCH_LIST="${ARCH:3:1}.${ARCH:4}"
fi
export TORCH_CUDA_ARCH_LIST
echo "building for $ARCH (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"

step "install (editable, no dependencies, no network)"
if ! "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1; then
  cat "$OUT/install.log"
  # No usable setuptools/wheel there: do what an editable install does by hand, a meta-path finder (loaded
  # by a .pth file) that maps pyproject's package-dir entries (slmopt.native -> cuda/, ...) to their folders.
  echo "pip install -e failed; installing a package-dir finder instead" | tee -a "$OUT/install.log"
  "$PY" - <<'PYEOF' 2>&1 | tee -a "$OUT/install.log" || failed+=(install)
import sysconfig, tomllib
from pathlib import Path
root = Path.cwd()
cfg = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
mapping = {name: str(root / folder) for name, folder in cfg["package-dir"].items()}
site = Path(sysconfig.get_paths()["purelib"])
(site / "slmopt_gpu_check_finder.py").write_text(f"""import importlib.util, sys
from pathlib import Path
MAPPING = {mapping!r}
class Finder:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name not in MAPPING:
            return None
        folder = Path(MAPPING[name])
        return importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])
sys.meta_path.insert(0, Finder)
""")
(site / "slmopt_gpu_check.pth").write_text("import slmopt_gpu_check_finder\n")
print("package-dir finder installed in", site, mapping)
PYEOF
fi
"$PY" -c 'import slmopt.ops, slmopt.native.build, slmopt.backends.tensorrt.kernel' || failed+=(import)

step "nvcc: fff.cu object + PTX for $ARCH, plugin PTX, and the torch extension"
timeout 300 "$PY" - <<PYEOF 2>&1 | tee "$OUT/build.log" || failed+=(build)
import time
from pathlib import Path
from slmopt.native import build
from slmopt.backends.tensorrt import kernel
out = Path("$OUT") / "build"
for ptx in (False, True):
    t = time.time(); p = build.compile_cuda("$ARCH", out, ptx=ptx); print(f"{p.name}: {time.time() - t:.1f} s")
t = time.time(); p = kernel.compile_ptx(kernel.DEFAULT_ARCH, cache_dir=out); print(f"plugin {p.name}: {kernel.ptx_header(p.read_text())} {time.time() - t:.1f} s")
t = time.time(); p = build.load_cuda_extension(); print(f"torch extension {p}: {time.time() - t:.1f} s")
PYEOF
rm -rf "$OUT/build"

step "tests marked gpu / cuda_build"
timeout 300 "$PY" -m pytest -q -rs -p no:cacheprovider -m "gpu or cuda_build" --junitxml="$OUT/pytest.xml" \
  --continue-on-collection-errors \
  tests/native/test_cuda_gpu.py tests/native/test_cuda_build.py tests/backends/test_tensorrt.py \
  tests/backends/test_tensorrt_traps.py 2>&1 | tee "$OUT/pytest.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed+=(tests)
grep -q " passed" "$OUT/pytest.log" || failed+=(no-tests-ran)

step "compute-sanitizer (memcheck, racecheck) on both designs, small shapes"
if command -v compute-sanitizer >/dev/null; then
  cat >"$OUT/sanitize.py" <<'PYEOF'
import torch
from slmopt import ops
from tests.native.test_cuda_build import PARAM_NAMES, make
assert ops.load_cuda_kernel(), ops._cuda_state
for design, act in (("gated", "silu"), ("both", "gelu")):
    for tokens in (3, 40):  # token kernel, batched path
        p = {k: (v.cuda() if v is not None else None) for k, v in make(96, 3, 72, design, tokens).items()}
        x = torch.randn(tokens, 96, device="cuda")
        torch.ops.slmopt.fff(x, *(p[k] for k in PARAM_NAMES), act)
torch.cuda.synchronize()
print("sanitized run done")
PYEOF
  : >"$OUT/sanitize.log"
  for tool in memcheck racecheck; do
    echo "--- $tool" >>"$OUT/sanitize.log"
    # PYTHONPATH: the script lives in $OUT but imports the repository's tests package.
    PYTHONPATH="$PWD" timeout 150 compute-sanitizer --tool "$tool" --kernel-name kns=slmopt --error-exitcode 9 \
      "$PY" "$OUT/sanitize.py" >>"$OUT/sanitize.log" 2>&1
    rc=$?
    tail -3 "$OUT/sanitize.log"
    [ $rc -eq 0 ] || { echo "compute-sanitizer $tool: exit $rc"; failed+=("sanitizer-$tool"); }
  done
  rm -f "$OUT/sanitize.py"
else
  echo "compute-sanitizer not found: skipped"
fi

step "op benchmark (batch 1 and 16384, fp32 and fp16; FFF CUDA kernel vs cuBLAS dense FFN)"
timeout 200 "$PY" benchmarks/bench_fff_gpu.py --json "$OUT/bench_fff_gpu.json" 2>&1 | tee "$OUT/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed+=(benchmark)

step "done"
if [ ${#failed[@]} -ne 0 ]; then
  echo "GPU CHECK FAILED: ${failed[*]}"
  exit 1
fi
echo "GPU CHECK PASSED"
