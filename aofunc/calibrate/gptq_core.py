"""The GPTQ algorithm on one weight: quantize W [N, K] column by column, pushing each column's error onto the
columns not yet quantized through the inverse Hessian of the layer's inputs. Pure functions on tensors.

    H = (2/t) Σ x xᵀ,  Hinv = chol(chol⁻¹(chol(H + λI)))ᵀ,  err_i = (w_i - q(w_i)) / Hinv[i,i],  W[:, j>i] -= err_i Hinv[i, j]
"""
from __future__ import annotations

import functools

import torch

from aofunc import primitives as P
from aofunc.formats import Scheme
from aofunc.formats.scheme import grouped_schemes

# ---------------------------------------------------------------------------------------------- Hessians

@functools.cache
def _mm_accumulates_to_fp32(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.mm(..., out_dtype=torch.float32) takes half-precision inputs on this device."""
    probe = torch.ones(2, 2, dtype=dtype, device=device)
    try:
        torch.mm(probe, probe, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True


def input_gram(x: torch.Tensor) -> torch.Tensor:
    """xᵀ x in fp32 for layer inputs x [tokens, K]: one call's share of Σ x xᵀ."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and _mm_accumulates_to_fp32(x.device, x.dtype):
        # half-precision products are exact in fp32, so accumulating them there loses nothing, without a copy of x
        return torch.mm(x.t(), x, out_dtype=torch.float32)
    x32 = x.float()
    return x32.t() @ x32


def hessian(total: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """H = (2/t) Σ x xᵀ from the running sum and the token count t."""
    return total * (2.0 / tokens.clamp(min=1))


def inverse_hessian_factor(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """The upper Cholesky factor of (H + λI)⁻¹, λ = percdamp · mean(diag H); λ grows tenfold until H + λI
    factorizes, so near-singular Hessians (tiny calibration sets, collinear inputs) never fail."""
    k = H.shape[0]
    mean_diag = torch.diagonal(H).mean()
    eye = torch.eye(k, dtype=H.dtype, device=H.device)
    damp = percdamp if percdamp > 0 else 1e-6
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(H + (damp * mean_diag) * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return U
        damp *= 10
    raise ValueError("gptq: the Hessian does not factorize even with damping 10^7 times the requested; "
                     "its inputs are degenerate")


def _group(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """The columns of one group, zero-padded to the full group as the stored format pads K."""
    return P.pad_to_multiple(w, group_size)


# ---------------------------------------------------------------------------------------------- the algorithm

def gptq_quantize_weight(W: torch.Tensor, H: torch.Tensor, scheme: Scheme, blocksize: int = 128,
                         percdamp: float = 0.01, act_order: bool = False) -> dict[str, torch.Tensor]:
    """The stored tensors of `scheme` for W [N, K] (canonical orientation) quantized by GPTQ with Hessian H [K, K].

    Columns whose diag(H) is 0 (dead inputs) get H = 1 and W = 0. Blocks of `blocksize` columns are quantized
    column by column, each error pushed onto the block's later columns at once and onto the rest of the matrix
    lazily after the block. Group qparams are chosen when a group starts, from the current (error-updated)
    weights. With `act_order`, columns go by decreasing diag(H) and the groups are static: their qparams come
    from the weights before any update, so the stored layout is the usual one. The result has the same names,
    shapes and dtypes as `scheme.quantize(W)`.

    Example:
        >>> W, X = torch.randn(64, 256), torch.randn(1024, 256) @ torch.randn(256, 256)
        >>> parts = gptq_quantize_weight(W, 2 * X.T @ X / 1024, aofunc.Int4WeightOnly(128))
        >>> sorted(parts)
        ['qdata', 'scale', 'zero']
    """
    quantizer = scheme.group_quantizer(W.dtype) if isinstance(scheme, Scheme) else None
    if quantizer is None:
        names = " or ".join(cls.__name__ for cls in grouped_schemes())
        raise TypeError(f"gptq: scheme must be a format with groups along K ({names}), got {scheme!r}")
    n, k = W.shape
    if tuple(H.shape) != (k, k):
        raise ValueError(f"gptq: H must be [{k}, {k}] for a weight with K = {k}, got {tuple(H.shape)}")
    if not bool(torch.isfinite(H).all()):
        raise ValueError("gptq: the Hessian has non-finite values; the layer's calibration inputs are not finite")
    gs = scheme.group_size
    n_groups = -(-k // gs)

    W = W.detach().float().clone()
    H = H.detach().float().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    # column c of W is row c of Wt: each step reads and updates contiguous memory
    scale = torch.zeros(n_groups, n, dtype=torch.float32, device=W.device)
    zero = torch.zeros_like(scale)
    if act_order:
        for g in range(n_groups):
            scale[g], zero[g] = quantizer.choose(_group(W[:, g * gs:(g + 1) * gs], gs))
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
        group_of = (perm // gs).tolist()
    else:
        perm = None
        group_of = [c // gs for c in range(k)]
    base = quantizer.base(scale, zero)
    Wt = W.t().contiguous()
    del W

    Hinv = inverse_hessian_factor(H, percdamp)
    del H
    codes = torch.empty(k, n, dtype=torch.float32, device=Wt.device)
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        W1 = Wt[i1:i2].clone()
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = group_of[col]
            if not act_order and col % gs == 0:
                # the group's current weights: updated inside this block, and pending this block's errors beyond it
                end = min(col + gs, k)
                current = W1[i:end - i1]
                if end > i2:
                    current = torch.cat([current, Wt[i2:end] - Hinv[i1:col, i2:end].t() @ Err1[:i]])
                scale[g], zero[g] = quantizer.choose(_group(current.t(), gs))
                base[g] = quantizer.base(scale[g], zero[g])
            w, c, s, b = W1[i], codes[col], scale[g], base[g]
            torch.div(w - b, s, out=c)
            c.round_().clamp_(quantizer.lowest, quantizer.highest)
            torch.div(w - torch.addcmul(b, c, s), Hinv1[i, i], out=Err1[i])
            W1[i:].addr_(Hinv1[i, i:], Err1[i], alpha=-1)
        Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1)

    codes, scale, zero = codes.t(), scale.t(), zero.t()
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    padded = n_groups * gs
    if padded > k:
        # the format pads K with zero weights: their codes are those of 0 in the last group
        last_s, last_b = scale[:, -1:], quantizer.base(scale[:, -1:], zero[:, -1:])
        pad = torch.round((0 - last_b) / last_s).clamp_(quantizer.lowest, quantizer.highest)
        codes = torch.cat([codes, pad.expand(n, padded - k)], dim=1)
    return quantizer.stored(codes, scale, zero)
