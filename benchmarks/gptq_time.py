"""How long GPTQ takes on a model with Llama-3-8B shapes (random weights): time whole runs of 1 and 2 blocks and
extrapolate to 32 (per block = t2 - t1, fixed cost = t1 - per block), plus the GPTQ of Llama-3-8B's lm_head alone.

    python benchmarks/gptq_time.py --sequences 128 --seq-len 2048 --batch 8 --json out.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import aofunc
from aofunc.calibrate.gptq_core import gptq_quantize_weight


class Attention(nn.Module):
    def __init__(self, dim, heads, kv_heads):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = (z * cos + torch.cat([-z[..., z.shape[-1] // 2:], z[..., :z.shape[-1] // 2]], -1) * sin for z in (q, k))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, dim, heads, kv_heads, hidden):
        super().__init__()
        self.attn_norm, self.mlp_norm = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.attn = Attention(dim, heads, kv_heads)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Llama(nn.Module):
    def __init__(self, layers, dim=4096, heads=32, kv_heads=8, hidden=14336, vocab=1024):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, heads, kv_heads, hidden) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.head_dim = dim // heads

    def forward(self, tokens):
        t = tokens.shape[1]
        inv = 500000.0 ** (-torch.arange(0, self.head_dim, 2, device=tokens.device) / self.head_dim)
        angles = torch.outer(torch.arange(t, device=tokens.device).float(), inv).repeat(1, 2)
        x = self.embed(tokens)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


def time_gptq(layers: int, args) -> dict:
    torch.manual_seed(0)
    device = torch.device(args.device)
    with torch.device(device):
        model = Llama(layers, args.dim, args.heads, args.kv_heads, args.hidden).to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    params = {n: p.detach() for n, p in model.named_parameters()}
    batches = [torch.randint(0, 1024, (args.batch, args.seq_len), device=device)
               for _ in range(args.sequences // args.batch)]
    spec = aofunc.Spec([aofunc.Rule(r"layers\..*\.(q|k|v|o|gate|up|down)\.weight", aofunc.Int4WeightOnly(128))])
    torch.cuda.synchronize() if device.type == "cuda" else None
    torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
    start = time.perf_counter()
    qparams = aofunc.gptq(params, batches, model=model, spec=spec, act_order=args.act_order, progress=False)
    torch.cuda.synchronize() if device.type == "cuda" else None
    seconds = time.perf_counter() - start
    finite = all(bool(torch.isfinite(t.scale.float()).all()) for t in qparams.values()
                 if isinstance(t, aofunc.QTensor))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"layers": layers, "seconds": seconds, "finite": finite, "peak_gib": peak}


def time_lm_head(args) -> float:
    """GPTQ of a [128256, 4096] bf16 weight with a Hessian from 8192 correlated rows (the algorithm only)."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    W = (torch.randn(128256, 4096, device=device) * 0.02).to(torch.bfloat16)
    X = torch.randn(8192, 256, device=device) @ torch.randn(256, 4096, device=device)
    H = 2 * X.T @ X / X.shape[0]
    torch.cuda.synchronize() if device.type == "cuda" else None
    start = time.perf_counter()
    gptq_quantize_weight(W, H, aofunc.Int4WeightOnly(128))
    torch.cuda.synchronize() if device.type == "cuda" else None
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sequences", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=14336)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--act-order", action="store_true")
    parser.add_argument("--lm-head", action="store_true", help="also time GPTQ of Llama-3-8B's lm_head")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    time_gptq(1, argparse.Namespace(**{**vars(args), "sequences": args.batch}))  # warm-up: kernels, allocator
    runs = [time_gptq(layers, args) for layers in (1, 2)]
    per_block = runs[1]["seconds"] - runs[0]["seconds"]
    fixed = runs[0]["seconds"] - per_block
    result = {"card": card, "torch": torch.__version__, "sequences": args.sequences, "seq_len": args.seq_len,
              "batch": args.batch, "act_order": args.act_order, "runs": runs, "per_block_s": per_block,
              "fixed_s": fixed, "estimate_32_blocks_s": fixed + 32 * per_block}
    if args.lm_head:
        result["lm_head_s"] = time_lm_head(args)
    print(json.dumps(result, indent=1))
    print("| card | tokens | act_order | 1 block s | 2 blocks s | per block s | 32 blocks (est.) s | peak GiB |")
    print(f"| {card} | {args.sequences}x{args.seq_len} | {args.act_order} | {runs[0]['seconds']:.1f} | "
          f"{runs[1]['seconds']:.1f} | {per_block:.2f} | {fixed + 32 * per_block:.0f} | {runs[1]['peak_gib']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
