"""Rules and specs: which parameters get which scheme, by regular expression on their names."""
from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Mapping, NamedTuple, Sequence

import torch

from aofunc.formats import Scheme
from aofunc.tree import tied_groups


class SpecWarning(UserWarning):
    """A spec asked for something it cannot do: a rule that matched nothing, or a weight its scheme cannot take."""


@dataclasses.dataclass(frozen=True)
class Rule:
    r"""Parameters whose name `re.fullmatch`es `pattern` get `scheme` (None keeps them in full precision).

    `transposed=True` says the model stores the weight as [in, out] (GPT-2's Conv1D), so groups run along dim 0.

    Example:
        >>> aofunc.Rule(r".*\.weight", aofunc.Int8WeightOnly()).matches("layers.0.fc.weight")
        True
    """

    pattern: str
    scheme: Scheme | None
    transposed: bool = False

    def __post_init__(self):
        if not isinstance(self.pattern, str):
            raise TypeError(f"Rule: pattern must be a string, got {type(self.pattern).__name__}")
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"Rule: pattern {self.pattern!r} is not a valid regular expression: {e}") from None
        if self.scheme is not None and not isinstance(self.scheme, Scheme):
            raise TypeError(f"Rule {self.pattern!r}: scheme must be an aofunc scheme or None, "
                            f"got {self.scheme!r}")

    def matches(self, name: str) -> bool:
        """Whether the pattern matches the whole name."""
        return re.fullmatch(self.pattern, name) is not None


class SpecReport(NamedTuple):
    """What a spec could not do on a params tree: rules that matched nothing, and skipped weights with the reason."""

    unused_rules: list[Rule]
    skipped: dict[str, str]

    def __str__(self):
        lines = [f"rule {r.pattern!r} matched no parameter" for r in self.unused_rules]
        lines += [f"{name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines) or "every rule matched and every selected weight can be taken"


def is_conv_name(name: str | None) -> bool:
    """Whether a parameter name is a torch convolution's kernel (`weight`, as nn.Conv1d and friends name it)."""
    return name is not None and name.rsplit(".", 1)[-1] == "weight"


def unsupported_reason(tensor: torch.Tensor, rule: Rule, name: str | None = None) -> str | None:
    """Why a scheme cannot take this tensor (None when it can): schemes take 2-D weights, 1x1 conv weights, and
    stacked experts, 3-D tensors [E, N, K] whose name is not a convolution's `weight` (stored formats quantize
    them, `Sparse` prunes each expert)."""
    shape = tuple(tensor.shape)
    if len(shape) == 3 and rule.scheme is not None and not is_conv_name(name):
        return None
    if len(shape) == 4:
        if shape[2:] != (1, 1):
            return f"a conv weight with a {shape[2]}x{shape[3]} kernel (only 1x1 convolutions are taken)"
        if rule.transposed:
            return "a 1x1 conv weight cannot be stored transposed"
        return None
    if len(shape) == 3 and is_conv_name(name):
        return (f"a 3-D tensor of shape {shape} named like a convolution's kernel (schemes take 2-D weights, 1x1 "
                "conv weights and stacked experts)")
    if len(shape) != 2:
        return f"a {len(shape)}-D tensor of shape {shape} (schemes take 2-D weights and 1x1 conv weights)"
    return None


def _choice(rule: Rule | None) -> tuple | None:
    return None if rule is None else (rule.scheme, rule.transposed)


def _describe(rule: Rule | None) -> str:
    if rule is None:
        return "full precision"
    return f"{rule.scheme}" + (" (transposed)" if rule.transposed else "")


class Spec:
    """An ordered list of rules; the first rule whose pattern fully matches a name decides.

    Example:
        >>> spec = aofunc.Spec([aofunc.Rule(r"lm_head\\.weight", None),
        ...                     aofunc.Rule(r".*\\.weight", aofunc.Int4WeightOnly(group_size=128))])
        >>> spec.labels({"fc.weight": torch.randn(8, 256), "fc.bias": torch.randn(8)})
        {'fc.weight': Int4WeightOnly(group_size=128), 'fc.bias': None}
    """

    def __init__(self, rules: Sequence[Rule], strict: bool = False):
        rules = list(rules)
        for i, rule in enumerate(rules):
            if not isinstance(rule, Rule):
                raise TypeError(f"Spec: rules[{i}] must be an aofunc.Rule, got {type(rule).__name__}")
        self.rules = tuple(rules)
        self.strict = bool(strict)

    def __repr__(self):
        return f"Spec({list(self.rules)!r}" + (", strict=True)" if self.strict else ")")

    def rule_for(self, name: str) -> Rule | None:
        """The first rule whose pattern fully matches `name`, or None."""
        return next((rule for rule in self.rules if rule.matches(name)), None)

    def selected(self, params: Mapping[str, torch.Tensor]) -> dict[str, Rule]:
        """{name: rule} for the parameters whose rule has a scheme that can take them.

        Names holding one tensor object (tied weights) are one weight: the rule of any of them applies to all, and
        rules that give them different schemes (a scheme and None, or two schemes) are an error.
        """
        decided: dict[str, Rule | None] = {}
        for name, tensor in params.items():
            rule = self.rule_for(name)
            if rule is not None:
                takes = rule.scheme is not None and unsupported_reason(tensor, rule, name) is None
                decided[name] = rule if takes else None
        chosen = {name: rule for name, rule in decided.items() if rule is not None}
        for names in tied_groups(params):
            ruled = [name for name in names if name in decided]
            if not ruled:
                continue
            first = decided[ruled[0]]
            for name in ruled[1:]:
                if _choice(decided[name]) != _choice(first):
                    raise ValueError(
                        f"aofunc spec: {ruled[0]!r} and {name!r} are one tensor (tied weights), but the spec gives "
                        f"{ruled[0]!r} {_describe(first)} and {name!r} {_describe(decided[name])}; a tied weight "
                        "takes one scheme, so give all its names the same one (or untie them)")
            if first is not None:
                chosen.update({name: first for name in names if name not in chosen})
        return {name: chosen[name] for name in params if name in chosen}

    def labels(self, params: Mapping[str, torch.Tensor]) -> dict:
        """{name: scheme or None}: the scheme each parameter gets (None: kept in full precision)."""
        chosen = self.selected(params)
        return {name: chosen[name].scheme if name in chosen else None for name in params}

    def report(self, params: Mapping[str, torch.Tensor]) -> SpecReport:
        """Rules that matched no parameter, and the weights a rule selects that its scheme cannot take."""
        used, skipped = set(), {}
        for name, tensor in params.items():
            rule = self.rule_for(name)
            if rule is None:
                continue
            used.add(rule)
            reason = unsupported_reason(tensor, rule, name) if rule.scheme is not None else None
            if reason is not None:
                skipped[name] = f"{type(rule.scheme).__name__} cannot take {reason}; kept in full precision"
        return SpecReport([rule for rule in self.rules if rule not in used], skipped)

    def check(self, params: Mapping[str, torch.Tensor]) -> None:
        """Warn with SpecWarning (raise ValueError when strict) about everything `report` lists."""
        report = self.report(params)
        if report.unused_rules or report.skipped:
            message = f"aofunc spec: {report}"
            if self.strict:
                raise ValueError(message)
            warnings.warn(message, SpecWarning, stacklevel=3)
