"""The demo model's weights: the checkpoint shipped with the package, or one trained on first use and cached.

A checkpoint is a safetensors file of fp16 weights (small enough to ship) whose header carries the recipe
it was trained by, as JSON. The model it loads into runs in fp32.

The shipped checkpoint is produced by
``python -m aofunc.demo.checkpoint --size small --device cuda --out aofunc/demo/small.safetensors``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from aofunc.demo import data
from aofunc.demo.model import Llama, LlamaConfig
from aofunc.demo.train import RECIPES, Recipe, train

FORMAT = "aofunc-demo-1"
SHIPPED = {"small": Path(__file__).with_name("small.safetensors")}


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/aofunc``, else ``~/.cache/aofunc``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "aofunc"


def cache_path(recipe: Recipe, size: str) -> Path:
    """Where a model trained by ``recipe`` on this Python's standard library is cached.

    Keyed by the Python version (its standard library is the corpus) and a hash of the recipe.
    """
    key = hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / f"demo-{size}-py{sys.version_info.major}{sys.version_info.minor}-{key}.safetensors"


def save(model: Llama, recipe: Recipe, path, **info) -> None:
    """Writes ``model``'s weights in fp16 and ``recipe`` (plus ``info``) as JSON metadata; atomic (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().to(torch.float16).contiguous() for name, p in model.named_parameters()}
    meta = {
        "format": FORMAT,
        "recipe": json.dumps(recipe.to_dict()),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "torch": torch.__version__,
    }
    meta.update({k: json.dumps(v) for k, v in info.items()})
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.chmod(tmp, 0o644)  # mkstemp makes the file private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path) -> tuple[Llama, Recipe, dict]:
    """``(model in fp32 eval mode, its recipe, the file's metadata)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path {str(path)!r} is not a file")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"path {str(path)!r} is not a demo checkpoint (format {meta.get('format')!r}, expected {FORMAT!r})")
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    spec = json.loads(meta["recipe"])
    recipe = Recipe(config=LlamaConfig(**spec.pop("config")), **spec)
    model = Llama(recipe.config)
    expected = {name: p.shape for name, p in model.named_parameters()}
    missing, extra = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
    if missing or extra:
        raise ValueError(f"path {str(path)!r}: missing tensors {sorted(missing)}, unexpected tensors {sorted(extra)}")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise ValueError(f"path {str(path)!r}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {tuple(shape)}")
    model.load_state_dict({name: t.float() for name, t in tensors.items()}, strict=False)
    model.eval()
    return model, recipe, meta


def pretrained(size: str = "small", *, device="cpu", progress: bool = True) -> tuple[Llama, Recipe, str]:
    """``(model, recipe, where it came from)``: the shipped checkpoint for ``size``, else the cached one, else trained now and cached."""
    if size not in RECIPES:
        raise ValueError(f"size must be one of {sorted(RECIPES)}, got {size!r}")
    shipped = SHIPPED.get(size)
    if shipped is not None and shipped.is_file():
        model, recipe, _ = load(shipped)
        return model, recipe, f"shipped checkpoint {shipped.name}"
    recipe = RECIPES[size]
    path = cache_path(recipe, size)
    if path.is_file():
        model, recipe, _ = load(path)
        return model, recipe, f"cached checkpoint {path}"
    train_tokens, _ = data.corpus()
    model = train(recipe, train_tokens, device=device, progress=progress)
    save(model, recipe, path)
    model, recipe, _ = load(path)  # the fp16-rounded weights, the same model a later run loads
    return model, recipe, f"trained now, cached at {path}"


def main(argv=None):
    """Train a recipe on the standard library and write its checkpoint (how the shipped one was made)."""
    parser = argparse.ArgumentParser(prog="python -m aofunc.demo.checkpoint",
                                     description="Train the demo model on the standard library and write its "
                                                 "checkpoint.")
    parser.add_argument("--size", choices=sorted(RECIPES), default="small")
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's number of steps")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True, help="safetensors file to write")
    args = parser.parse_args(argv)
    recipe = RECIPES[args.size]
    if args.steps is not None:
        recipe = replace(recipe, steps=args.steps)
    train_tokens, _ = data.corpus()
    start = time.perf_counter()
    model = train(recipe, train_tokens, device=args.device)
    seconds = time.perf_counter() - start
    save(model, recipe, args.out, train_seconds=round(seconds, 1), device=torch.device(args.device).type)
    print(f"trained {args.size} in {seconds:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
