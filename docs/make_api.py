"""Writes docs/api.md, the API reference, from the signatures and docstrings of every name in aofunc.__all__.

    python docs/make_api.py          # rewrite docs/api.md
    python docs/make_api.py --check  # exit 1, changing nothing, when docs/api.md is not what the code gives now

tests/test_docs.py runs the check, so the page cannot drift from the code.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
import typing
from pathlib import Path

import aofunc

API_PAGE = Path(__file__).resolve().parent / "api.md"

#: sections of the page, in reading order; a public name no section lists goes under "Other names"
SECTIONS = (
    ("Schemes and the quantized weight",
     ("Int8WeightOnly", "Int8Dynamic", "Int4WeightOnly", "Int8DynamicInt4", "NF4", "Scheme", "QTensor")),
    ("Specs", ("Rule", "Spec", "SpecReport", "SpecWarning")),
    ("Round-to-nearest", ("quantize", "dequantize")),
    ("Calibrated transforms", ("gptq", "smoothquant", "wanda", "prune", "Sparse", "semi_structured")),
    ("The fold and the capture mode", ("Calibration", "fold", "capture_inputs", "record_shapes")),
    ("Building blocks of the calibrated transforms",
     ("gptq_calibration", "gptq_quantize_weight", "HessianState", "smoothquant_calibration", "SmoothQuantState",
      "wanda_calibration", "WandaState")),
    ("Running, files and measures", ("apply", "bind", "qlinear", "tune", "save", "load", "save_pretrained", "load_pretrained", "sqnr", "size_in_bytes")),
)


def generated_docstring(obj) -> str | None:
    """The docstring Python writes itself for a dataclass or NamedTuple that has none, else None."""
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
        return obj.__name__ + str(inspect.signature(obj)).replace(" -> None", "")
    if inspect.isclass(obj) and issubclass(obj, tuple) and hasattr(obj, "_fields"):
        return f"{obj.__name__}({', '.join(obj._fields)})"
    return None


def own_docstring(obj) -> str | None:
    """The docstring written for obj itself (not inherited, not generated), cleaned of indentation; None if none."""
    doc = obj.__doc__ if isinstance(obj.__doc__, str) else None
    if doc is None or not doc.strip() or doc == generated_docstring(obj):
        return None
    return inspect.cleandoc(doc)


def annotation_text(annotation) -> str:
    if isinstance(annotation, str):
        return annotation
    if isinstance(annotation, typing.ForwardRef):
        return annotation.__forward_arg__
    if inspect.isclass(annotation):
        return annotation.__qualname__
    return repr(annotation).replace("typing.", "")


def signature_text(name: str, obj, skip_first: bool = False) -> str:
    """name(params) -> return, written the same way on every Python version (annotations as in the source)."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return f"{name}(...)"
    parts, keyword_marker_done, positional_only = [], False, False
    parameters = list(signature.parameters.values())[1 if skip_first else 0:]
    for p in parameters:
        if p.kind is p.POSITIONAL_ONLY:
            positional_only = True
        elif positional_only:
            parts.append("/")
            positional_only = False
        if p.kind is p.KEYWORD_ONLY and not keyword_marker_done:
            parts.append("*")
            keyword_marker_done = True
        if p.kind is p.VAR_POSITIONAL:
            keyword_marker_done = True
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        if p.annotation is not p.empty:
            text += f": {annotation_text(p.annotation)}"
        if p.default is not p.empty:
            text += (" = " if p.annotation is not p.empty else "=") + repr(p.default)
        parts.append(text)
    if positional_only:
        parts.append("/")
    text = f"{name}({', '.join(parts)})"
    if signature.return_annotation is not signature.empty and not inspect.isclass(obj):
        text += f" -> {annotation_text(signature.return_annotation)}"
    return text


def docstring_markdown(doc: str) -> str:
    """A docstring as Markdown: prose lines unindented, each run of doctest lines (>>> ... and the output
    that follows, up to a blank line) fenced as a pycon block."""
    lines = doc.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith(">>>"):
            indent = len(line) - len(line.lstrip())
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i][indent:] if lines[i][:indent].isspace() else lines[i].lstrip())
                i += 1
            if out and out[-1].strip():
                out.append("")
            out += ["```pycon", *block, "```"]
            continue
        out.append(line.strip())
        i += 1
    return "\n".join(out).strip()


def public_members(cls) -> list[tuple[str, object, str]]:
    """(name, member, docstring) of the documented public methods and properties that cls itself defines."""
    members = []
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        function = member.__func__ if isinstance(member, (staticmethod, classmethod)) else member
        if isinstance(function, property) or inspect.isfunction(function):
            doc = own_docstring(function)
            if doc is not None:
                members.append((name, function, doc))
    return members


def entry(name: str) -> str:
    obj = getattr(aofunc, name)
    lines = [f"### `aofunc.{name}`", ""]
    if inspect.isclass(obj) and issubclass(obj, BaseException):
        bases = ", ".join(base.__name__ for base in obj.__bases__)
        lines += ["```python", f"class {name}({bases})", "```"]
    elif inspect.isclass(obj):
        lines += ["```python", "class " + signature_text(name, obj), "```"]
    else:
        lines += ["```python", signature_text(name, obj), "```"]
    doc = own_docstring(obj)
    lines += ["", docstring_markdown(doc) if doc else "(no docstring)"]
    if inspect.isclass(obj):
        for member_name, member, member_doc in public_members(obj):
            if isinstance(member, property):
                title = f"{name}.{member_name}"
            else:
                title = signature_text(f"{name}.{member_name}", member, skip_first=True)
            lines += ["", f"- `{title}`", "", *["  " + line if line else "" for line in
                                                 docstring_markdown(member_doc).splitlines()]]
    return "\n".join(lines)


def sections() -> list[tuple[str, list[str]]]:
    """(title, names) in page order, every name of aofunc.__all__ exactly once."""
    public = list(aofunc.__all__)
    placed, out = set(), []
    for title, names in SECTIONS:
        present = [name for name in names if name in public]
        placed.update(present)
        if present:
            out.append((title, present))
    rest = sorted(name for name in public if name not in placed)
    if rest:
        out.append(("Other names", rest))
    return out


def api_markdown() -> str:
    """The text of docs/api.md."""
    parts = [
        "# API reference",
        "",
        "<!-- Generated by docs/make_api.py from the docstrings; edit the code, then run"
        " `python docs/make_api.py`. -->",
        "",
        "Everything `import aofunc` exports (`aofunc.__all__`), with its signature and docstring. Pages that"
        " explain the ideas: [the functional model](functional-model.md), [the methods](index.md#methods).",
        "",
    ]
    for title, names in sections():
        parts.append(f"- [{title}](#{anchor(title)}): " + ", ".join(f"`{name}`" for name in names))
    for title, names in sections():
        parts += ["", f"## {title}"]
        for name in names:
            parts += ["", entry(name)]
    return "\n".join(parts) + "\n"


def anchor(title: str) -> str:
    """The anchor GitHub gives a heading: lower case, spaces to hyphens, punctuation dropped."""
    return "".join(c for c in title.lower().replace(" ", "-") if c.isalnum() or c in "-_")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/api.md differs; write nothing")
    args = p.parse_args(argv)
    text = api_markdown()
    current = API_PAGE.read_text(encoding="utf-8") if API_PAGE.exists() else None
    if args.check:
        if current != text:
            print(f"{API_PAGE} is out of date: run python docs/make_api.py", file=sys.stderr)
            return 1
        return 0
    if current != text:
        API_PAGE.write_text(text, encoding="utf-8")
        print(f"wrote {API_PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
