"""Small models built in code for the tests: biases, a tied embedding, a 1x1 conv, a GPT-2-style Conv1D."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import aofunc

ALL_SCHEMES = [aofunc.Int8WeightOnly(), aofunc.Int8Dynamic(), aofunc.Int4WeightOnly(32),
               aofunc.Int8DynamicInt4(32), aofunc.NF4(), aofunc.Int4WeightOnly(32, zero_point="int"),
               aofunc.Int4WeightOnly(64, zero_point="none")]


class Conv1D(nn.Module):
    """GPT-2's linear: the weight stored [in, out], applied as addmm(bias, x, weight)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * n_in ** -0.5)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], -1)


class Block(nn.Module):
    def __init__(self, d, heads=4):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = Conv1D(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyTransformer(nn.Module):
    """Token embedding tied to the output head, two blocks, and a 1x1 conv mixing channels at the end."""

    def __init__(self, vocab=96, d=64, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(layers))
        self.mix = nn.Conv2d(d, d, kernel_size=1)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        x = x + self.mix(x.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
        return self.head(self.norm(x))


def is_detached_alias(out, given) -> bool:
    """Whether a transform passed `given` through as it should: a new plain tensor (never an nn.Parameter) on the
    same memory, with the same shape, strides and requires_grad."""
    return (type(out) is torch.Tensor and out is not given and out.data_ptr() == given.data_ptr()
            and out.shape == given.shape and out.stride() == given.stride()
            and out.requires_grad == given.requires_grad)


def tiny_transformer(seed=0, **kwargs):
    torch.manual_seed(seed)
    return TinyTransformer(**kwargs).eval()
