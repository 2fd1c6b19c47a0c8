import pytest
import torch
from torch.func import functional_call

from aofunc.demo.model import Llama, LlamaConfig, init_weights

CONFIG = LlamaConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=48, max_seq_len=16)


def make_model():
    model = Llama(CONFIG)
    init_weights(model, torch.Generator().manual_seed(0))
    # Larger norm weights than the init so that every block matters in the comparisons below.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(10)
    return model.eval()


def test_params_are_the_linear_embedding_and_norm_weights():
    names = dict(make_model().named_parameters()).keys()
    assert "layers.1.attn.q.weight" in names and "layers.0.mlp.down.weight" in names and "lm_head.weight" in names
    assert all(n.endswith(".weight") for n in names)
    assert len(names) == 1 + 2 * 9 + 2  # embed, 2 blocks of (2 norms + 7 linears), norm, lm_head


def test_forward_is_causal():
    model = make_model()
    x = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[:, 6:] = (y[:, 6:] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(y)
    assert a.shape == (2, 10, 256)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_cached_decoding_matches_the_full_forward():
    model = make_model()
    x = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(x)
        model.setup_cache(batch=2, max_len=12)
        prefill = model(x[:, :5], torch.arange(5))
        steps = [model(x[:, i : i + 1], torch.tensor([i])) for i in range(5, 9)]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), full, rtol=1e-4, atol=1e-4)


def test_functional_call_with_new_params_leaves_the_model_alone():
    model = make_model()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    params["lm_head.weight"] = torch.zeros_like(params["lm_head.weight"])
    x = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        assert torch.count_nonzero(functional_call(model, params, (x,))) == 0
        assert torch.count_nonzero(model(x)) > 0


def test_bad_config_and_inputs_are_refused():
    with pytest.raises(ValueError, match="n_heads"):
        LlamaConfig(dim=30, n_heads=4)
    with pytest.raises(ValueError, match="hidden_dim"):
        LlamaConfig(hidden_dim=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        make_model()(torch.zeros(1, 17, dtype=torch.long))
