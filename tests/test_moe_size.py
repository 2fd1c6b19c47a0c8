"""The size a mixture-of-experts model quantizes to, computed on the meta device from its real config (no memory)."""
import warnings

import pytest
import torch

import aofunc

transformers = pytest.importorskip("transformers")


def test_mixtral_8x7b_int4_experts_and_attention_take_under_three_tenths_of_bf16():
    config = transformers.MixtralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                                        num_experts_per_tok=2, vocab_size=32000)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    spec = aofunc.Spec([aofunc.Rule(r".*(mlp\.experts\.(gate_up_proj|down_proj)|self_attn\.[qkvo]_proj\.weight)",
                                    aofunc.Int4WeightOnly(128))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", aofunc.SpecWarning)
        qparams = aofunc.quantize(params, spec)
    experts = [name for name, t in qparams.items() if isinstance(t, aofunc.QTensor) and t.dim() == 3]
    assert len(experts) == 2 * 32  # gate_up and down of every layer, each one stacked QTensor of 8 experts
    assert qparams["model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 2 * 14336, 4096)
    bf16, int4 = aofunc.size_in_bytes(params), aofunc.size_in_bytes(qparams)
    assert bf16 == 2 * sum(p.numel() for p in params.values())
    assert int4 / bf16 <= 0.30  # 25.2 GB of 93.4 GB
