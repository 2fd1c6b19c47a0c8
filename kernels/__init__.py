"""Triton kernels and their plain-torch reference twins, on plain tensors only: the package ``aofunc.kernels``.

Python started in a source checkout has the checkout on ``sys.path``, where this folder would be found as a
top-level package ``kernels`` and shadow the package of that name on PyPI (which transformers imports). Imported by
that name, this file loads the installed ``kernels`` in its place, if there is one.
"""


def _stand_aside(name: str) -> None:
    """Put the installed package ``name`` found elsewhere on sys.path in sys.modules in place of this folder."""
    import importlib.machinery
    import importlib.util
    import os
    import sys

    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != checkout]
    spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


if __name__ != "aofunc.kernels":
    _stand_aside(__name__)
