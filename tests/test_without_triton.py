"""Where Triton is not installed (macOS, Windows), aofunc imports and every CPU path works; a Triton launch says
what is missing."""
import subprocess
import sys

SCRIPT = r'''
import sys
sys.modules["triton"] = None  # makes `import triton` fail, as on a machine without it
import torch
import aofunc
from aofunc.kernels import triton_compat, w4a16

assert not triton_compat.available()
torch.manual_seed(0)
w, x = torch.randn(64, 128), torch.randn(5, 128)
for scheme in (aofunc.Int8WeightOnly(), aofunc.Int8Dynamic(), aofunc.Int4WeightOnly(32), aofunc.Int8DynamicInt4(32),
               aofunc.NF4()):
    q = aofunc.quantize({"w": w}, aofunc.Spec([aofunc.Rule("w", scheme)]))["w"]
    assert aofunc.sqnr(x @ w.T, aofunc.qlinear(x, q)) > 10, scheme
q = aofunc.quantize({"w": w}, aofunc.Spec([aofunc.Rule("w", aofunc.Int4WeightOnly(32))]))["w"]
try:
    w4a16.w4a16_linear_triton(x, q.qdata, q.scale, q.zero, 32)
except ImportError as error:
    assert "Triton is not installed" in str(error)
else:
    raise AssertionError("a Triton launch without Triton must fail")
print("ok")
'''


def test_import_and_cpu_paths_without_triton():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_triton_is_imported_only_when_a_kernel_first_runs():
    script = r'''
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import torch
import aofunc
assert "triton" not in sys.modules, "import aofunc imported Triton"
w = torch.randn(64, 128)
q = aofunc.quantize({"w": w}, aofunc.Spec([aofunc.Rule("w", aofunc.Int4WeightOnly(32))]))["w"]
aofunc.qlinear(torch.randn(3, 128), q)  # the CPU runs torch's kernels
assert "triton" not in sys.modules, "a CPU linear imported Triton"
print("ok")
'''
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
