"""The checkout's ``kernels`` folder is the package ``aofunc.kernels``: Python started in the checkout (tests, the
demo, the benchmarks) finds it on ``sys.path`` as a top-level ``kernels`` too, and it must not stand in for the
package of that name on PyPI, which transformers imports."""
import os
import subprocess
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


def run_in_checkout(script: str, extra_path: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(CHECKOUT), extra_path) if p))
    return subprocess.run([sys.executable, "-c", script], cwd=CHECKOUT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_an_installed_kernels_package_is_the_one_imported(tmp_path):
    other = tmp_path / "kernels"
    other.mkdir()
    (other / "__init__.py").write_text("MARKER = 'the installed package'\n")
    done = run_in_checkout("import kernels, aofunc.kernels.tiles\nprint(kernels.MARKER)", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "the installed package"


def test_without_one_the_folder_imports_as_an_empty_module_and_aofunc_kernels_works():
    done = run_in_checkout("import kernels, aofunc.kernels.tiles as t\n"
                           "print(sorted(k for k in vars(kernels) if not k.startswith('_')), t.__name__)")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[] aofunc.kernels.tiles"
