"""Small models for the calibration tests: a Llama-style decoder on continuous inputs (RMSNorm, keyword mask and
rotary inputs to its blocks), a GPT-2-style block with LayerNorm and a Conv1D, and correlated input data."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.models import Conv1D


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x, rope, mask):
        b, t, d = x.shape
        q, k, v = (proj(x).view(b, t, self.heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        cos, sin = rope
        q, k = q * cos + q.flip(-1) * sin, k * cos + k.flip(-1) * sin
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d, heads, hidden):
        super().__init__()
        self.attn_norm = nn.RMSNorm(d)
        self.attn = Attention(d, heads)
        self.mlp_norm = nn.RMSNorm(d)
        self.gate = nn.Linear(d, hidden, bias=False)
        self.up = nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x, rope, *, mask):
        x = x + self.attn(self.attn_norm(x), rope, mask)
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TinyLlama(nn.Module):
    """x [batch, time, d] -> [batch, time, out]: input projection, blocks (mask and rotary passed in), head."""

    def __init__(self, d=64, heads=4, hidden=128, layers=2, out=48):
        super().__init__()
        self.inp = nn.Linear(d, d, bias=False)
        self.layers = nn.ModuleList(Block(d, heads, hidden) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, out, bias=False)
        self.heads = heads

    def forward(self, x):
        t = x.shape[1]
        head_dim = x.shape[-1] // self.heads
        angles = torch.arange(t, dtype=x.dtype, device=x.device)[:, None] \
            * torch.linspace(0.1, 1, head_dim, dtype=x.dtype, device=x.device)
        rope = (angles.cos(), angles.sin())
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x, rope, mask=mask)
        return self.head(self.norm(x))


def tiny_llama(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = TinyLlama(**kwargs).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def correlated(n, t=16, d=64, rank=8, seed=0, outliers=()):
    """[n, t, d] inputs with low-rank channel correlations, uneven channel scales and optional outlier channels;
    the mixing is the same for every seed (one distribution), the samples differ."""
    mix = torch.randn(rank, d, generator=torch.Generator().manual_seed(1234)) * torch.linspace(0.2, 2.0, d)
    x = torch.randn(n, t, rank, generator=torch.Generator().manual_seed(seed + 1)) @ mix
    x = x + 0.05 * torch.randn(n, t, d, generator=torch.Generator().manual_seed(seed + 2))
    for c in outliers:
        x[..., c] *= 50
    return x


class GPT2Block(nn.Module):
    """LayerNorm -> Conv1D qkv (stored [in, out]); LayerNorm -> Linear up; down reads a GELU (nothing to fold)."""

    def __init__(self, d=64):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Conv1D(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.attn(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, 4, -1).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.down(F.gelu(self.up(self.ln2(x))))


def gpt2_block(seed=0, d=64):
    torch.manual_seed(seed)
    model = GPT2Block(d).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("ln"):
                p.add_(torch.rand(p.shape) * 0.5)  # norms that are not the identity, so folding changes them
            p.requires_grad_(False)
    return model
