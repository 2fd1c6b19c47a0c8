"""`python -m aofunc quantize` on a mixture-of-experts model: experts quantized, routers kept in full precision."""
import re

import pytest

pytest.importorskip("transformers")

import aofunc  # noqa: E402
from aofunc.cli.main import main  # noqa: E402
from tests.test_experts import tiny_moe  # noqa: E402


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_quantize_takes_stacked_experts_and_keeps_the_routers(tmp_path, capsys, kind):
    model = tiny_moe(kind, "grouped_mm")
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "q.safetensors"
    status = main(["quantize", str(tmp_path / "model"), "--method", "rtn", "--scheme", "int8wo", "--out", str(out),
                   "--no-progress"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert re.search(r"\((4) stacked-expert tensors\)", printed), printed
    loaded = aofunc.load(out)
    stacks = [name for name, t in loaded.items() if isinstance(t, aofunc.QTensor) and t.stacked]
    assert len(stacks) == 4 and all("experts" in name for name in stacks)
    for name, t in loaded.items():
        if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight", "embed_tokens.weight", "lm_head.weight")):
            assert not isinstance(t, aofunc.QTensor), name
    if kind == "qwen2_moe":
        assert isinstance(loaded["model.layers.0.mlp.shared_expert.up_proj.weight"], aofunc.QTensor)
