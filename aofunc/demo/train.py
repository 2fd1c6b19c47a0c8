"""Deterministic training of the demo model on the standard library.

Given the recipe (sizes, steps, seed) the weights are a function of the corpus alone: the initial weights
and the batch offsets come from generators seeded by ``seed``, and torch runs in deterministic mode. On one
machine with one thread count, two runs give bit-identical weights.

The shipped checkpoint is produced by
``python -m aofunc.demo.checkpoint --size small --device cuda --out aofunc/demo/small.safetensors`` (the command
lives with the checkpoint files, which build on this module); the file's metadata records the device, the torch
and the Python version (whose standard library was the corpus).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from aofunc.demo import data
from aofunc.demo.model import Llama, LlamaConfig, init_weights


@dataclass(frozen=True)
class Recipe:
    """A model's sizes and how it is trained: AdamW, linear warmup then cosine decay to ``lr * min_lr_ratio``."""

    config: LlamaConfig = field(default_factory=LlamaConfig)
    steps: int = 2000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"Recipe.{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len > self.config.max_seq_len:
            raise ValueError(f"Recipe.seq_len ({self.seq_len}) exceeds config.max_seq_len ({self.config.max_seq_len})")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f"Recipe.warmup must lie in 0..steps-1, got {self.warmup}")

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "config"}
        d["config"] = self.config.to_dict()
        return d


RECIPES = {
    # For tests and --quick: trains in seconds, enough to beat the uniform model.
    "tiny": Recipe(LlamaConfig(dim=64, n_layers=2, n_heads=2, hidden_dim=128, max_seq_len=128),
                   steps=30, batch_size=8, seq_len=64, lr=1e-2, warmup=5),
    # The shipped default.
    "small": Recipe(LlamaConfig(dim=256, n_layers=4, n_heads=4, hidden_dim=384, max_seq_len=512),
                    steps=8000, batch_size=32, seq_len=256, lr=3e-3, warmup=200),
    # For a GPU: trained on first use and cached.
    "base": Recipe(LlamaConfig(dim=512, n_layers=8, n_heads=8, hidden_dim=1536, max_seq_len=1024),
                   steps=4000, batch_size=32, seq_len=512, lr=2e-3, warmup=200),
}


def learning_rate(recipe: Recipe, step: int) -> float:
    """``lr * step/warmup`` while warming up, then ``lr * (m + (1-m) * (1 + cos(pi * progress)) / 2)``."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    m = recipe.min_lr_ratio
    return recipe.lr * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * progress)))


def loss_on(model: Llama, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross entropy of ``batch`` [b, t+1] (nats per byte)."""
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


def train(recipe: Recipe, stream: torch.Tensor, *, device="cpu", progress: bool = True) -> Llama:
    """A model trained by ``recipe`` on windows of ``stream`` (uint8 tokens), in fp32, on ``device``.

    Example::

        train_tokens, _ = data.corpus()
        model = train(RECIPES["tiny"], train_tokens)
    """
    device = torch.device(device)
    model = Llama(recipe.config)
    init_weights(model, torch.Generator().manual_seed(recipe.seed))
    model.to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim != 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, betas=(0.9, 0.95), eps=1e-8, foreach=False,
    )
    batches = torch.Generator().manual_seed(recipe.seed + 1)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
    try:
        model.train()
        bar = tqdm(range(recipe.steps), desc="train", disable=not progress, unit="step")
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(recipe, step)
            batch = data.random_batch(stream, recipe.batch_size, recipe.seq_len, batches).to(device)
            loss = loss_on(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip, foreach=False)
            optimizer.step()
            if step % 10 == 0 or step == recipe.steps - 1:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    finally:
        torch.use_deterministic_algorithms(previous)
    model.eval()
    return model.cpu()
