"""The documentation stays true: docs/api.md is what docs/make_api.py generates from the code now, every public
name has its own docstring, the Python blocks of the pages run, links between pages resolve, and the command
line page names exactly the flags the commands take."""
import dataclasses
import doctest
import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest
import torch

import aofunc

DOCS = Path(__file__).resolve().parent.parent / "docs"
FENCE = re.compile(r"^```python\n(.*?)^```", re.M | re.S)
#: pages whose Python blocks run in order in one namespace (cli.md's need a Hugging Face checkpoint)
RUNNABLE = ["index.md", "quickstart.md", "functional-model.md", "coming-from-torchao.md", "file-format.md",
            "kernels.md"] + sorted(
    f"methods/{p.name}" for p in (DOCS / "methods").glob("*.md"))


def make_api():
    spec = importlib.util.spec_from_file_location("make_api", DOCS / "make_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def python_blocks(page: str) -> list[str]:
    return FENCE.findall((DOCS / page).read_text(encoding="utf-8"))


def run_page(page: str) -> dict:
    """Every Python block of the page, in order, in one namespace; returns the namespace.

    One intra-op thread: the snippets are tiny, and on a small shared machine more threads only contend."""
    module = types.ModuleType("__docs__")  # importable while it runs: torch.compile looks globals up by module
    blocks = python_blocks(page)
    assert blocks, f"{page} has no python blocks"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    sys.modules["__docs__"] = module
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f"{page}, python block {i + 1}", "exec"), module.__dict__)
    finally:
        torch.set_num_threads(threads)
        del sys.modules["__docs__"]
    return module.__dict__


# ---------------------------------------------------------------------------------------------- the API page

def test_api_page_is_what_make_api_generates_now():
    written = (DOCS / "api.md").read_text(encoding="utf-8")
    assert written == make_api().api_markdown(), "docs/api.md is out of date: run python docs/make_api.py"


def test_all_lists_exactly_the_public_names():
    public = {name for name in dir(aofunc) if not name.startswith("_")
              and not isinstance(getattr(aofunc, name), types.ModuleType)}
    assert len(aofunc.__all__) == len(set(aofunc.__all__))
    assert set(aofunc.__all__) == public


def test_every_public_name_has_its_own_docstring():
    own = make_api().own_docstring
    assert [name for name in aofunc.__all__ if own(getattr(aofunc, name)) is None] == []


def test_the_api_page_documents_every_public_name_once():
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    documented = re.findall(r"^### `aofunc\.(\w+)`$", text, re.M)
    assert sorted(documented) == sorted(aofunc.__all__)


def test_generated_docstrings_do_not_count_as_docstrings():
    api = make_api()

    @dataclasses.dataclass(frozen=True)
    class Undocumented:
        size: int = 1

    assert api.own_docstring(Undocumented) is None
    assert api.own_docstring(aofunc.HessianState).startswith("Σ x xᵀ")


def test_the_examples_the_api_page_shows_run():
    """Each docstring example of a public name, in its module's namespace plus the public names (the page shows
    them unqualified); examples that use names defined before them (``model``, ``x``, ``qparams``) get a small
    linear model."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    context = {**{name: getattr(aofunc, name) for name in aofunc.__all__},
               "aofunc": aofunc, "torch": torch, "nn": torch.nn, "model": model, "x": torch.randn(3, 64),
               "qparams": aofunc.quantize(dict(model.named_parameters()),
                                          aofunc.Spec([aofunc.Rule(r"0\.weight", aofunc.Int8WeightOnly())]))}
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    attempted = set()
    for name in aofunc.__all__:
        obj = getattr(aofunc, name)
        globs = {**vars(sys.modules[obj.__module__]), **context}
        for test in doctest.DocTestFinder().find(obj, name, globs=globs):
            if test.examples:
                attempted.add(test.name)
                runner.run(test)
    assert runner.failures == 0
    assert {"quantize", "Spec", "fold", "gptq", "qlinear"} <= attempted


def test_doctest_examples_become_fenced_blocks():
    text = make_api().docstring_markdown("y = f(x).\n\nExample:\n    >>> f(1)\n    2\n\nMore prose.")
    assert text == "y = f(x).\n\nExample:\n\n```pycon\n>>> f(1)\n2\n```\n\nMore prose."


# ---------------------------------------------------------------------------------------------- runnable pages

def test_quickstart_runs_and_says_what_it_shows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = run_page("quickstart.md")
    assert (tmp_path / "tiny-int8.safetensors").is_file()
    qparams, params = ns["qparams"], ns["params"]
    assert isinstance(qparams["up.weight"], aofunc.QTensor) and not isinstance(qparams["head.weight"], aofunc.QTensor)
    assert all(params[name] is p for name, p in ns["model"].named_parameters())  # the input tree is untouched
    assert qparams["up.bias"] is not params["up.bias"] and type(qparams["up.bias"]) is torch.Tensor
    assert qparams["up.bias"].data_ptr() == params["up.bias"].data_ptr()  # an alias, not a copy
    assert torch.equal(ns["loaded"]["down.weight"].dequantize(), qparams["down.weight"].dequantize())
    assert 50 < aofunc.sqnr(ns["y_float"], ns["y"]) < 70                   # "about 57 dB"
    assert aofunc.size_in_bytes(params) == 135464 and aofunc.size_in_bytes(qparams) == 38440
    assert aofunc.sqnr(ns["y"], ns["y_compiled"]) > 100
    assert len(ns["outputs"]) == 16 and ns["tokens"].shape == (1, 12)   # threads; generate() under bind
    assert not any(isinstance(p, aofunc.QTensor) for p in ns["llama"].parameters())
    errors = {type(s).__name__: e for s, e in ns["errors"].items()}
    assert min(errors["Int8WeightOnly"], errors["Int8Dynamic"]) > 45
    assert all(25 < errors[name] < 40 for name in ("Int4WeightOnly", "Int8DynamicInt4", "NF4"))


@pytest.mark.parametrize("page", [p for p in RUNNABLE if p != "quickstart.md"])
def test_page_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    run_page(page)


# ---------------------------------------------------------------------------------------------- links and the CLI

def github_anchor(heading: str) -> str:
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return "".join(c for c in text.replace(" ", "-") if c.isalnum() or c in "-_")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
    return {github_anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_links_between_pages_resolve():
    broken = []
    for page in sorted(DOCS.rglob("*.md")):
        text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, fragment = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists():
                broken.append(f"{page.relative_to(DOCS)}: {target} (no such file)")
            elif fragment and path.suffix == ".md" and fragment not in anchors(path):
                broken.append(f"{page.relative_to(DOCS)}: {target} (no such heading)")
    assert broken == []


def command_flags() -> dict[str, set[str]]:
    from aofunc.cli.main import parser

    subparsers = next(a for a in parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return {name: {s for action in sub._actions for s in action.option_strings if s.startswith("--") and s != "--help"}
            for name, sub in subparsers.choices.items()}


def test_cli_page_names_exactly_the_flags_each_command_takes():
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    sections = dict(re.findall(r"^## `python -m aofunc (\w+)`\n(.*?)(?=^## |\Z)", text, re.M | re.S))
    flags = command_flags()
    assert set(sections) == set(flags)
    for command, section in sections.items():
        assert set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", section)) == flags[command], command


def test_the_kernels_page_shows_the_route_table_the_code_has():
    from aofunc.kernels import selector

    assert selector.routes_table() in (DOCS / "kernels.md").read_text(encoding="utf-8")
