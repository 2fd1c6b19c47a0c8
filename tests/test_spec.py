"""Rules and specs: first match wins, None keeps full precision, what cannot be applied is reported."""
import warnings

import pytest
import torch

import aofunc
from aofunc import Rule, Spec, SpecWarning

PARAMS = {
    "layers.0.attn.q.weight": torch.randn(8, 16),
    "layers.0.attn.q.bias": torch.randn(8),
    "layers.0.conv.weight": torch.randn(8, 16, 3, 3),
    "layers.0.pointwise.weight": torch.randn(8, 16, 1, 1),
    "lm_head.weight": torch.randn(32, 16),
}


def test_first_matching_rule_wins_and_none_keeps_full_precision():
    spec = Spec([Rule(r"lm_head\.weight", None), Rule(r".*\.weight", aofunc.Int8WeightOnly()),
                 Rule(r".*", aofunc.NF4())])
    labels = spec.labels(PARAMS)
    assert labels["lm_head.weight"] is None
    assert labels["layers.0.attn.q.weight"] == aofunc.Int8WeightOnly()
    assert labels["layers.0.pointwise.weight"] == aofunc.Int8WeightOnly()
    assert labels["layers.0.conv.weight"] is None  # a 3x3 conv cannot be taken
    assert labels["layers.0.attn.q.bias"] is None  # 1-D: cannot be taken


def test_patterns_match_the_whole_name():
    spec = Spec([Rule(r"q\.weight", aofunc.Int8WeightOnly())])
    assert spec.labels(PARAMS)["layers.0.attn.q.weight"] is None


def test_report_lists_unused_rules_and_skipped_weights():
    spec = Spec([Rule(r"nothing\.here", aofunc.NF4()), Rule(r".*", aofunc.Int8WeightOnly())])
    report = spec.report(PARAMS)
    assert [r.pattern for r in report.unused_rules] == [r"nothing\.here"]
    assert set(report.skipped) == {"layers.0.attn.q.bias", "layers.0.conv.weight"}
    assert "3x3" in report.skipped["layers.0.conv.weight"]
    assert "1-D" in report.skipped["layers.0.attn.q.bias"]
    assert "nothing" in str(report)


def test_quantize_warns_about_what_it_cannot_do_and_leaves_it_in_full_precision():
    spec = Spec([Rule(r".*", aofunc.Int8WeightOnly())])
    with pytest.warns(SpecWarning, match="layers.0.conv.weight"):
        q = aofunc.quantize(PARAMS, spec)
    assert torch.equal(q["layers.0.conv.weight"], PARAMS["layers.0.conv.weight"])
    assert q["layers.0.conv.weight"].data_ptr() == PARAMS["layers.0.conv.weight"].data_ptr()
    assert isinstance(q["lm_head.weight"], aofunc.QTensor)


def test_strict_spec_makes_them_errors():
    spec = Spec([Rule(r".*", aofunc.Int8WeightOnly())], strict=True)
    with pytest.raises(ValueError, match="layers.0.attn.q.bias"):
        aofunc.quantize(PARAMS, spec)


def test_a_clean_spec_is_silent():
    spec = Spec([Rule(r".*(q|lm_head)\.weight", aofunc.Int8WeightOnly()), Rule(r".*", None)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aofunc.quantize(PARAMS, spec)


def test_rules_are_checked_when_made():
    with pytest.raises(ValueError, match="regular expression"):
        Rule("(unclosed", aofunc.NF4())
    with pytest.raises(TypeError, match="scheme"):
        Rule(".*", "int8")
    with pytest.raises(TypeError, match="rules\\[1\\]"):
        Spec([Rule(".*", None), ".*"])


def test_transposed_is_refused_for_conv_weights():
    spec = Spec([Rule(r".*pointwise.*", aofunc.Int8WeightOnly(), transposed=True)])
    assert "transposed" in str(spec.report(PARAMS))


def test_a_rule_for_one_tied_name_labels_every_name_of_the_tensor():
    w = torch.randn(16, 64)
    spec = Spec([Rule("embed", aofunc.Int8WeightOnly())])
    assert spec.labels({"embed": w, "head": w, "other": torch.randn(16, 64)}) == {
        "embed": aofunc.Int8WeightOnly(), "head": aofunc.Int8WeightOnly(), "other": None}
    with pytest.raises(ValueError, match=r"'embed' and 'head' are one tensor.*Int8WeightOnly\(\).*full precision"):
        Spec([Rule("embed", aofunc.Int8WeightOnly()), Rule("head", None)]).labels({"embed": w, "head": w})
