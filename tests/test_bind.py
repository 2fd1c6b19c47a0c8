"""bind: the unmodified module computes with a tree inside a with block, and has its own tensors back after it."""
import copy
import threading

import pytest
import torch

import aofunc
from aofunc import Rule, Spec
from tests.models import tiny_transformer
from tests.test_apply import assert_restored, own_tensors

BLOCK_WEIGHTS = Spec([Rule(r"layers\..*\.(qkv|up|down)\.weight", aofunc.Int4WeightOnly(32)),
                      Rule(r"embed\.weight", aofunc.Int8WeightOnly())])


def model_and_tree():
    model = tiny_transformer()
    return model, aofunc.quantize(dict(model.named_parameters()), BLOCK_WEIGHTS)


def test_the_module_computes_with_the_tree_inside_the_block_and_its_own_tensors_after():
    model, q = model_and_tree()
    ids = torch.randint(0, 96, (2, 6))
    before = own_tensors(model)
    with torch.no_grad():
        expected = aofunc.apply(model, q, ids)
        with aofunc.bind(model, q) as bound:
            assert bound is model
            assert model.layers[0].up.weight is q["layers.0.up.weight"]
            assert torch.equal(model(ids), expected)
            assert torch.equal(model.forward(ids), expected)
        float_out = model(ids)
    assert not torch.equal(float_out, expected)
    assert_restored(model, before)


def test_tied_weights_stay_tied_inside_and_after_the_block():
    model, q = model_and_tree()
    assert "head.weight" not in q
    with aofunc.bind(model, q):
        assert model.head.weight is model.embed.weight is q["embed.weight"]
    assert model.head.weight is model.embed.weight and isinstance(model.embed.weight, torch.nn.Parameter)
    by_other_name = {k: v for k, v in q.items() if k != "embed.weight"} | {"head.weight": q["embed.weight"]}
    with aofunc.bind(model, by_other_name):
        assert model.head.weight is model.embed.weight is q["embed.weight"]


def test_an_exception_in_the_block_restores_the_module():
    model, q = model_and_tree()
    before = own_tensors(model)
    with pytest.raises(RuntimeError, match="inside the block"):
        with aofunc.bind(model, q):
            assert isinstance(model.layers[1].down.weight, aofunc.QTensor)
            raise RuntimeError("inside the block")
    assert_restored(model, before)
    with pytest.raises(RuntimeError):  # an op a QTensor does not answer, raised by the module's own code
        with aofunc.bind(model, q), torch.no_grad():
            model.layers[0].up.weight.add_(1)
    assert_restored(model, before)


def test_unknown_keys_are_refused_before_anything_is_swapped():
    model, q = model_and_tree()
    before = own_tensors(model)
    q = dict(q)
    q["layers.0.up.weigth"] = q.pop("layers.0.up.weight")
    q["nothing.like.this"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"bind: .*'layers.0.up.weigth' \(did you mean 'layers.0.up.weight'\?\)"
                                       r".*'nothing.like.this'"):
        with aofunc.bind(model, q):
            pytest.fail("the block must not run")
    assert_restored(model, before)
    with pytest.raises(TypeError, match="nn.Module"):
        with aofunc.bind(lambda x: x, {}):
            pass


def test_apply_inside_bind_on_the_same_thread_and_nested_binds():
    model, q = model_and_tree()
    other = {name: t.detach() * 0.5 for name, t in model.named_parameters()}
    ids = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        expected_q, expected_other = aofunc.apply(model, q, ids), aofunc.apply(model, other, ids)
        with aofunc.bind(model, q):
            assert torch.equal(aofunc.apply(model, other, ids), expected_other)  # the lock is re-entrant
            assert torch.equal(model(ids), expected_q)  # and the block's tensors are back
            with aofunc.bind(model, other):
                assert torch.equal(model(ids), expected_other)
            assert torch.equal(model(ids), expected_q)


def test_other_threads_wait_for_the_block():
    model, q = model_and_tree()
    other = {name: t.detach() * 0.5 for name, t in model.named_parameters()}
    ids = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        expected_q, expected_other = aofunc.apply(model, q, ids), aofunc.apply(model, other, ids)
    results = []

    def call_apply():
        with torch.no_grad():
            results.append(aofunc.apply(model, other, ids))

    waiter = threading.Thread(target=call_apply)
    with torch.no_grad(), aofunc.bind(model, q):
        waiter.start()
        waiter.join(timeout=0.5)
        assert waiter.is_alive() and results == []  # apply waits for the module's lock
        assert torch.equal(model(ids), expected_q)
    waiter.join()
    assert len(results) == 1 and torch.equal(results[0], expected_other)


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=True,
                                      initializer_range=0.2)
    return transformers.LlamaForCausalLM(config).eval()


def test_generate_of_a_transformers_llama_under_bind():
    model = tiny_llama()
    params = dict(model.named_parameters())
    q = aofunc.quantize(params, Spec([Rule(r"model\.layers\..*_proj\.weight", aofunc.Int4WeightOnly(32)),
                                      Rule(r"model\.embed_tokens\.weight", aofunc.Int8WeightOnly())]))
    dequantized = copy.deepcopy(model)
    dequantized.load_state_dict(aofunc.dequantize(q), strict=False)
    assert dequantized.lm_head.weight is dequantized.model.embed_tokens.weight
    ids = torch.randint(1, 320, (2, 6))
    greedy = {"max_new_tokens": 8, "do_sample": False, "attention_mask": torch.ones_like(ids)}
    before = own_tensors(model)

    expected = dequantized.generate(ids, **greedy)
    with aofunc.bind(model, q):
        assert model.lm_head.weight is model.model.embed_tokens.weight  # tied in the block too
        out = model.generate(ids, **greedy)
    assert torch.equal(out, expected)
    assert_restored(model, before)
    assert not torch.equal(model.generate(ids, **greedy), expected)  # the float model answers otherwise

    with pytest.raises(ValueError):  # generate refuses a bad argument inside the block
        with aofunc.bind(model, q):
            model.generate(ids, max_new_tokens=-1)
    assert_restored(model, before)
