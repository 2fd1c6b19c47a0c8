"""A small Llama-style decoder language model in plain torch.

Every weight the quantizers touch is an ``nn.Linear`` weight, so the unmodified model runs quantized
through ``torch.func.functional_call``. The blocks sit in ``model.layers`` (an ``nn.ModuleList`` of one
class), which is where sequential GPTQ finds them. The rotary tables and the optional decode cache are
buffers, never parameters, so a params tree is exactly ``dict(model.named_parameters())``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LlamaConfig:
    """Sizes of the model. ``hidden_dim`` is the SwiGLU width; ``dim`` must divide by ``n_heads``."""

    vocab_size: int = 256
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    hidden_dim: int = 512
    max_seq_len: int = 512
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self):
        for field in ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim", "max_seq_len"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LlamaConfig.{field} must be a positive int, got {value!r}")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(
                f"LlamaConfig.dim ({self.dim}) must divide into n_heads ({self.n_heads}) heads of even size"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of ``pos * theta^(-2i/head_dim)``, each [max_seq_len, head_dim] (the half repeated twice)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half form: ``x * cos + [-x2, x1] * sin`` over the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache(nn.Module):
    """Keys and values of past positions for decoding, [batch, heads, max_len, head_dim] buffers."""

    def __init__(self, batch: int, n_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Writes ``k, v`` at positions ``pos`` and returns the whole cache."""
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.q = nn.Linear(config.dim, config.dim, bias=False)
        self.k = nn.Linear(config.dim, config.dim, bias=False)
        self.v = nn.Linear(config.dim, config.dim, bias=False)
        self.o = nn.Linear(config.dim, config.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, pos=None):
        b, t, _ = x.shape
        q, k, v = (proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2) for proj in (self.q, self.k, self.v))
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if pos is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k, v = self.cache.update(pos, k, v)
            visible = torch.arange(k.shape[2], device=x.device) <= pos[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.up = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.down = nn.Linear(config.hidden_dim, config.dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, pos=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, pos)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """``logits = lm_head(norm(blocks(embed(tokens))))``; tokens [batch, time] int64 -> logits [batch, time, vocab].

    Without ``pos`` the whole sequence is read causally from position 0. With ``pos`` (the positions of
    ``tokens``, after ``setup_cache``) keys and values are written to the cache and attention reads all
    cached positions up to ``pos`` — one step of decoding.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def setup_cache(self, batch: int, max_len: int | None = None, dtype=None):
        """Allocates a decode cache per block for ``batch`` sequences of up to ``max_len`` tokens."""
        max_len = self.config.max_seq_len if max_len is None else max_len
        if not 1 <= max_len <= self.config.max_seq_len:
            raise ValueError(f"max_len must lie in 1..{self.config.max_seq_len}, got {max_len}")
        dtype = self.lm_head.weight.dtype if dtype is None else dtype
        for block in self.layers:
            block.attn.cache = KVCache(
                batch, self.config.n_heads, max_len, self.config.head_dim, dtype, self.rope_cos.device
            )

    def remove_cache(self):
        """Frees the decode caches."""
        for block in self.layers:
            block.attn.cache = None

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        t = tokens.shape[-1]
        if pos is None:
            if t > self.config.max_seq_len:
                raise ValueError(f"tokens has {t} positions, more than max_seq_len={self.config.max_seq_len}")
            cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        else:
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        x = self.embed(tokens)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for block in self.layers:
            x = block(x, cos, sin, pos)
        return self.lm_head(self.norm(x))


def init_weights(model: Llama, generator: torch.Generator) -> None:
    """In place: normal(0, 0.02) for every weight, residual outputs (``o``, ``down``) scaled by 1/sqrt(2 n_layers), norms 1."""
    residual_std = 0.02 / (2 * model.config.n_layers) ** 0.5
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                std = residual_std if name.endswith(("attn.o.weight", "mlp.down.weight")) else 0.02
                param.normal_(0.0, std, generator=generator)
