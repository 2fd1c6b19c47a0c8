"""A Llama-3-8B-shaped decoder for decode benchmarks: plain nn.Linear layers and a static KV cache."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class LlamaShape:
    dim: int = 4096
    layers: int = 32
    heads: int = 32
    kv_heads: int = 8
    ffn: int = 14336
    vocab: int = 128256
    rope_theta: float = 500000.0
    max_seq: int = 1024
    batch: int = 1  # sequences decoded together: the KV cache's first dimension

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


def rope_tables(shape: LlamaShape, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / shape.rope_theta ** (torch.arange(0, shape.head_dim, 2, device=device).float() / shape.head_dim)
    angles = torch.outer(torch.arange(shape.max_seq, device=device).float(), inv)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of each head by the position's angles; x [B, H, T, D]."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, s: LlamaShape):
        super().__init__()
        self.s = s
        self.wq = nn.Linear(s.dim, s.dim, bias=False)
        self.wk = nn.Linear(s.dim, s.kv_heads * s.head_dim, bias=False)
        self.wv = nn.Linear(s.dim, s.kv_heads * s.head_dim, bias=False)
        self.wo = nn.Linear(s.dim, s.dim, bias=False)
        self.register_buffer("k_cache", torch.zeros(s.batch, s.kv_heads, s.max_seq, s.head_dim), persistent=False)
        self.register_buffer("v_cache", torch.zeros(s.batch, s.kv_heads, s.max_seq, s.head_dim), persistent=False)

    def forward(self, x, pos, cos, sin, mask):
        b, t, _ = x.shape
        s = self.s
        q = self.wq(x).view(b, t, s.heads, s.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, s.kv_heads, s.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, s.kv_heads, s.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v)
        a = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask, enable_gqa=True)
        return self.wo(a.transpose(1, 2).reshape(b, t, s.dim))


class Block(nn.Module):
    def __init__(self, s: LlamaShape):
        super().__init__()
        self.attention_norm = nn.RMSNorm(s.dim, eps=1e-5)
        self.attention = Attention(s)
        self.ffn_norm = nn.RMSNorm(s.dim, eps=1e-5)
        self.w1 = nn.Linear(s.dim, s.ffn, bias=False)
        self.w3 = nn.Linear(s.dim, s.ffn, bias=False)
        self.w2 = nn.Linear(s.ffn, s.dim, bias=False)

    def forward(self, x, pos, cos, sin, mask):
        x = x + self.attention(self.attention_norm(x), pos, cos, sin, mask)
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class Llama(nn.Module):
    """Decoder with a static KV cache: forward(tokens [batch, T], pos [T]) -> logits [batch, T, vocab]."""

    def __init__(self, s: LlamaShape):
        super().__init__()
        self.s = s
        self.tok_embeddings = nn.Embedding(s.vocab, s.dim)
        self.layers = nn.ModuleList(Block(s) for _ in range(s.layers))
        self.norm = nn.RMSNorm(s.dim, eps=1e-5)
        self.output = nn.Linear(s.dim, s.vocab, bias=False)
        cos, sin = rope_tables(s, None)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, tokens, pos):
        x = self.tok_embeddings(tokens)
        cos, sin = self.cos[pos], self.sin[pos]
        mask = torch.arange(self.s.max_seq, device=pos.device)[None, :] <= pos[:, None]
        for layer in self.layers:
            x = layer(x, pos, cos, sin, mask)
        return self.output(self.norm(x))


def random_llama(shape: LlamaShape = LlamaShape(), device="cuda", dtype=torch.bfloat16, seed=0) -> Llama:
    """The model with random weights (std 0.02), built on the device."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Llama(shape)
    for p in model.parameters():
        with torch.no_grad():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    return model.to(dtype).eval()
