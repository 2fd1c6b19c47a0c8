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


def test_the_folder_stands_for_no_package_of_that_name():
    # with no package named kernels installed, the folder imports as an empty module; with one (transformers 5.25
    # requires it), that one is imported
    done = run_in_checkout("import os, kernels, aofunc.kernels.tiles as t\n"
                           "ours = os.path.dirname(os.path.abspath(kernels.__file__)) == os.path.abspath('kernels')\n"
                           "public = sorted(k for k in vars(kernels) if not k.startswith('_'))\n"
                           "print(ours and public == [] or not ours, t.__name__)")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "True aofunc.kernels.tiles"
