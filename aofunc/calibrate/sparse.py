"""Pruning: the Sparse scheme, the masks it asks for, and magnitude pruning (importance |W|, no calibration).

Pruned weights stay dense tensors with zeros, so any format can quantize them afterwards.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Mapping

import torch
from tqdm.auto import tqdm

from aofunc.calibrate.selection import from_canonical
from aofunc.formats import Scheme
from aofunc.formats.qtensor import canonical
from aofunc.progress import show_progress
from aofunc.quantize import PROGRESS_NUMEL, plan
from aofunc.spec import Rule, Spec
from aofunc.tree import check_params, detached_aliases, share_tied, unique_by_tensor

_PATTERN = re.compile(r"(\d+):(\d+)")


@dataclasses.dataclass(frozen=True)
class Sparse(Scheme):
    """Zero the least important weights: a `sparsity` fraction of each output row (`per="row"`, as the Wanda paper
    ranks) or of the whole weight (`per="layer"`), or with `pattern="N:M"` keep N of every M consecutive weights
    along K ("2:4", the layout `torch.sparse.to_sparse_semi_structured` takes), so sparsity = 1 - N/M.

    `sparsity` defaults to 0.5, or to 1 - N/M with a pattern; a different value with a pattern is an error. Sparse
    is a pruning scheme for `aofunc.prune` and `aofunc.wanda` (on 2-D weights and on stacked experts, each expert
    pruned alone), not a stored format: `aofunc.quantize` refuses it,
    and files never name it.

    Example:
        >>> aofunc.Sparse(pattern="2:4")
        Sparse(sparsity=0.5, pattern='2:4', per='row')
    """

    sparsity: float | None = None
    pattern: str | None = None
    per: str = "row"
    is_stored_format = False

    def __post_init__(self):
        if self.per not in ("row", "layer"):
            raise ValueError(f"Sparse: per must be 'row' or 'layer', got {self.per!r}")
        if self.pattern is not None:
            match = _PATTERN.fullmatch(self.pattern) if isinstance(self.pattern, str) else None
            if match is None or not 0 < int(match[1]) < int(match[2]):
                raise ValueError(f"Sparse: pattern must be 'N:M' with 0 < N < M (N kept in every M), "
                                 f"got {self.pattern!r}")
            implied = 1 - int(match[1]) / int(match[2])
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise ValueError(f"Sparse: sparsity={self.sparsity} conflicts with pattern {self.pattern!r}, which "
                                 f"keeps {match[1]} of every {match[2]} (sparsity {implied:g}); give one of them")
            object.__setattr__(self, "sparsity", implied)
        elif self.sparsity is None:
            object.__setattr__(self, "sparsity", 0.5)
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) \
                or not 0 <= self.sparsity < 1:
            raise ValueError(f"Sparse: sparsity must be a number in [0, 1), got {self.sparsity!r}")
        object.__setattr__(self, "sparsity", float(self.sparsity))

    @property
    def n_m(self) -> tuple[int, int] | None:
        """(N kept, M) of an N:M pattern, else None."""
        if self.pattern is None:
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)

    def quantize(self, w):
        raise TypeError("Sparse is a pruning scheme, not a stored format: prune with aofunc.prune or aofunc.wanda, "
                        "then quantize the pruned weights with a format such as Int4WeightOnly")


def check_prunable(name: str, k: int, scheme: Sparse, what: str) -> None:
    """An N:M pattern needs K to be a multiple of M."""
    if scheme.n_m is not None and k % scheme.n_m[1]:
        raise ValueError(f"{what}: {name!r} has K = {k} input features, not a multiple of M = {scheme.n_m[1]} "
                         f"for the pattern {scheme.pattern!r}")


def prune_mask(importance: torch.Tensor, scheme: Sparse) -> torch.Tensor:
    """True where a weight of importance [N, K] is pruned: the least important per row, per layer, or per run of M
    along K. Ties go to the earlier index (a stable sort), so the mask is deterministic."""
    n, k = importance.shape
    mask = torch.zeros(n, k, dtype=torch.bool, device=importance.device)
    if scheme.n_m is not None:
        kept, m = scheme.n_m
        runs = importance.reshape(n, k // m, m)
        order = runs.argsort(dim=-1, stable=True)[..., :m - kept]
        return mask.reshape(n, k // m, m).scatter_(-1, order, True).reshape(n, k)
    if scheme.per == "row":
        count = int(k * scheme.sparsity)
        return mask.scatter_(1, importance.argsort(dim=1, stable=True)[:, :count], True)
    count = int(n * k * scheme.sparsity)
    flat = mask.reshape(-1)
    flat[importance.reshape(-1).argsort(stable=True)[:count]] = True
    return flat.reshape(n, k)


def pruned_weight(w: torch.Tensor, importance: torch.Tensor, scheme: Sparse, transposed: bool) -> torch.Tensor:
    """A new weight, in w's layout and dtype, with the weights `prune_mask` picks set to zero."""
    w_nk = canonical(w.detach(), transposed)
    return from_canonical(w_nk.masked_fill(prune_mask(importance, scheme), 0), w, transposed)


def magnitude_pruned(w: torch.Tensor, rule: Rule) -> torch.Tensor:
    """w pruned by |W| as its Sparse rule says; stacked experts (3-D) expert by expert, a plain float stack back."""
    if w.dim() == 3:
        return torch.stack([magnitude_pruned(expert, rule) for expert in w.unbind(0)])
    return pruned_weight(w, canonical(w.detach(), rule.transposed).float().abs(), rule.scheme, rule.transposed)


def sparse_rules(params: Mapping[str, torch.Tensor], spec: Spec, what: str) -> dict[str, Rule]:
    """{name: rule} of the weights a Sparse spec selects, checked before any work."""
    chosen = plan(params, spec, what=what)
    if not chosen:
        raise ValueError(f"{what}: the spec selects no weight; nothing to prune")
    for name, rule in chosen.items():
        if not isinstance(rule.scheme, Sparse):
            raise TypeError(f"{what}: {name!r} is selected with {rule.scheme}, but {what} takes Sparse rules")
        check_prunable(name, canonical(params[name], rule.transposed).shape[-1], rule.scheme, what)
    return chosen


def prune(params: Mapping[str, torch.Tensor], spec: Spec | None = None, *,
          progress: bool | None = None) -> dict[str, torch.Tensor]:
    """Magnitude pruning: new params whose selected weights have their smallest |W| set to zero as their Sparse
    rule asks (the calibration-free baseline to Wanda); `params` is left untouched.

    The default spec prunes half of every row of every 2-D floating point `*weight` (unstructured,
    `Sparse(0.5)`); give a spec to keep embeddings or heads dense. A spec may select stacked experts (3-D
    [E, N, K]): each expert is pruned alone by its own |W_e| (`per="layer"` ranks within the expert), and the
    result is a plain float stack. `progress`: a bar (True), none (False), or a
    bar for large trees when stderr is a terminal (None).

    Example:
        >>> params = {"fc.weight": torch.arange(1., 9.).reshape(1, 8)}
        >>> aofunc.prune(params, aofunc.Spec([aofunc.Rule(r".*weight", aofunc.Sparse(pattern="2:4"))]))["fc.weight"]
        tensor([[0., 0., 3., 4., 0., 0., 7., 8.]])
    """
    params = check_params(params)
    show_progress(progress, False, "prune")  # refuses anything but True, False or None before any work
    if spec is None:
        spec = Spec([Rule(re.escape(name), Sparse(0.5)) for name, t in params.items()
                     if name.endswith("weight") and t.dim() == 2 and t.is_floating_point()])
    if not isinstance(spec, Spec):
        raise TypeError(f"prune: spec must be an aofunc.Spec of Sparse rules, got {type(spec).__name__}")
    rules = sparse_rules(params, spec, "prune")
    out = detached_aliases(params)
    once = unique_by_tensor(params, rules)
    long = sum(params[name].numel() for name in once) > PROGRESS_NUMEL
    for name in tqdm(once, desc="prune", disable=not show_progress(progress, long, "prune"), unit="weight"):
        w, rule = params[name], rules[name]
        out[name] = magnitude_pruned(w, rule)
    return share_tied(out, params, once)


def is_two_four(w: torch.Tensor) -> bool:
    """Whether every run of 4 consecutive weights along the last dimension has at least 2 zeros."""
    return w.shape[-1] % 4 == 0 and bool(((w.reshape(*w.shape[:-1], -1, 4) == 0).sum(-1) >= 2).all())


def semi_structured(params: Mapping[str, torch.Tensor], names=None) -> dict[str, torch.Tensor]:
    """New params whose 2:4-pruned [N, K] weights are `torch.sparse.to_sparse_semi_structured` tensors, which
    F.linear runs with the GPU's sparse tensor cores; `params` is left untouched.

    `names` picks the weights (default: every 2-D fp16/bf16 CUDA weight whose runs of 4 along K hold 2 zeros).
    A named weight that cannot be converted (not on CUDA, not fp16/bf16, not 2:4) is an error naming it. Use it on
    weights pruned with `Sparse(pattern="2:4")` by `aofunc.prune` or `aofunc.wanda`; the semi-structured layout
    needs a card with sparse tensor cores (compute capability 8.0 or newer).
    """
    params = check_params(params)
    explicit = names is not None
    wanted = list(names) if explicit else [name for name, w in params.items() if w.dim() == 2]
    out = detached_aliases(params)
    converted, done = [], set()
    for name in wanted:
        if name not in params:
            raise KeyError(f"semi_structured: no parameter named {name!r}")
        w = params[name]
        if id(w) in done:  # a name tied to one converted already
            continue
        reason = ("not on a CUDA device" if w.device.type != "cuda" else
                  f"{w.dtype}, not fp16/bf16" if w.dtype not in (torch.float16, torch.bfloat16) else
                  "not 2-D" if w.dim() != 2 else
                  "not 2:4 sparse along K (every run of 4 needs 2 zeros)" if not is_two_four(w) else None)
        if reason is None:
            out[name] = torch.sparse.to_sparse_semi_structured(w.detach())
            converted.append(name)
            done.add(id(w))
        elif explicit:
            raise ValueError(f"semi_structured: {name!r} cannot take the semi-structured layout: {reason}")
    return share_tied(out, params, converted)
