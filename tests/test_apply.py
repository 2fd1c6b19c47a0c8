"""apply: functional_call that refuses unknown keys and handles tied weights, from many threads at once."""
import sys
import threading

import pytest
import torch

import aofunc
from aofunc import Rule, Spec
from tests.models import tiny_transformer


def test_apply_equals_functional_call():
    model = tiny_transformer()
    ids = torch.randint(0, 96, (2, 6))
    q = aofunc.quantize(dict(model.named_parameters()), Spec([Rule(r"layers\..*\.(up|down)\.weight",
                                                                   aofunc.Int8WeightOnly())]))
    with torch.no_grad():
        assert torch.equal(aofunc.apply(model, q, ids), torch.func.functional_call(model, q, (ids,)))


def test_unknown_keys_are_refused_with_a_suggestion():
    model = tiny_transformer()
    params = dict(model.named_parameters())
    params["layers.0.up.weigth"] = params.pop("layers.0.up.weight")
    with pytest.raises(KeyError, match=r"'layers.0.up.weigth' \(did you mean 'layers.0.up.weight'\?\)"):
        aofunc.apply(model, params, torch.zeros(1, 2, dtype=torch.long))


def test_tied_weights_take_the_value_given_for_either_name():
    model = tiny_transformer()
    ids = torch.randint(0, 96, (1, 5))
    params = dict(model.named_parameters())
    assert "head.weight" not in params  # tied to embed.weight
    q = aofunc.quantize(params, Spec([Rule(r"embed\.weight", aofunc.Int8WeightOnly())]))
    with torch.no_grad():
        y = aofunc.apply(model, q, ids)
        by_other_name = aofunc.apply(model, {**{k: v for k, v in q.items() if k != "embed.weight"},
                                             "head.weight": q["embed.weight"]}, ids)
    assert torch.equal(y, by_other_name)
    assert model.head.weight is model.embed.weight and not isinstance(model.embed.weight, aofunc.QTensor)


def test_the_model_is_left_exactly_as_it_was():
    model = tiny_transformer()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    q = aofunc.quantize(dict(model.named_parameters()), Spec([Rule(r".*\.weight", aofunc.NF4())]))
    with torch.no_grad():
        aofunc.apply(model, q, torch.randint(0, 96, (1, 4)))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not any(isinstance(p, aofunc.QTensor) for p in model.parameters())


def test_apply_refuses_a_non_module():
    with pytest.raises(TypeError, match="nn.Module"):
        aofunc.apply(lambda x: x, {}, 1)


# ---------------------------------------------------------------------------------------------- many threads

def own_tensors(model):
    """Every name of the module (tied names too) -> (the object it holds, a copy of its values)."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {name: (t, t.detach().clone()) for name, t in named}


def assert_restored(model, before):
    after = own_tensors(model)
    assert after.keys() == before.keys()
    for name, (t, values) in before.items():
        assert after[name][0] is t, name
        assert torch.equal(after[name][1], values), name


def trees_for_threads(model):
    params = dict(model.named_parameters())
    schemes = [aofunc.Int8WeightOnly(), aofunc.Int4WeightOnly(32), aofunc.NF4(), aofunc.Int8Dynamic()]
    trees = [aofunc.quantize(params, Spec([Rule(r"layers\..*\.(qkv|up|down)\.weight", scheme)]))
             for scheme in schemes]
    return trees + [{name: p.detach() * 0.5 if name.startswith("layers.1.") else p.detach()
                     for name, p in params.items()}]


def in_one_thread(fn):
    """fn() run on a fresh thread, so that the reference answers are computed the way the threads compute."""
    box = []
    worker = threading.Thread(target=lambda: box.append(fn()))
    worker.start()
    worker.join()
    return box[0]


@pytest.mark.parametrize("use_bind", [False, True])
def test_many_threads_on_one_module_get_the_single_threaded_answers(use_bind):
    model = tiny_transformer()
    trees = trees_for_threads(model)
    ids = torch.randint(0, 96, (2, 6))
    before = own_tensors(model)
    with torch.no_grad():
        expected = in_one_thread(lambda: [aofunc.apply(model, tree, ids) for tree in trees])
    assert all(not torch.equal(expected[0], e) for e in expected[1:])  # the trees give different answers

    threads, calls = 6, 40
    start = threading.Barrier(threads)
    wrong, errors = [0] * threads, []

    def work(i):
        try:
            start.wait()
            with torch.no_grad():
                for call in range(calls):
                    k = (i + call) % len(trees)
                    if use_bind and call % 2:  # half the calls through bind, calling the module itself
                        with aofunc.bind(model, trees[k]):
                            y = model(ids)
                    else:
                        y = aofunc.apply(model, trees[k], ids)
                    wrong[i] += not torch.equal(y, expected[k])
        except BaseException as e:  # noqa: BLE001  (reported by the main thread)
            errors.append(e)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # threads take turns often, as on a busy server
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == [] and wrong == [0] * threads
    assert_restored(model, before)
    assert model.head.weight is model.embed.weight


def test_a_compiled_apply_takes_no_lock_and_equals_eager():
    model = tiny_transformer()
    ids = torch.randint(0, 96, (2, 6))
    q = aofunc.quantize(dict(model.named_parameters()), Spec([Rule(r"layers\..*\.(up|down)\.weight",
                                                                   aofunc.Int8WeightOnly())]))
    compiled = torch.compile(aofunc.apply, fullgraph=True, backend="aot_eager")  # a traced lock would break it
    with torch.no_grad():
        torch.testing.assert_close(compiled(model, q, ids), aofunc.apply(model, q, ids))


def test_tied_names_given_different_tensors_are_refused_by_name():
    model = torch.nn.Module()
    model.emb = torch.nn.Embedding(8, 4)
    model.head = torch.nn.Linear(4, 8, bias=False)
    model.head.weight = model.emb.weight
    model.forward = lambda ids: model.head(model.emb(ids))
    with pytest.raises(ValueError, match="head.weight"):
        aofunc.apply(model, {"emb.weight": torch.randn(8, 4), "head.weight": torch.randn(8, 4)}, torch.tensor([1]))
    with pytest.raises(ValueError, match="head.weight"):
        with aofunc.bind(model, {"emb.weight": torch.randn(8, 4), "head.weight": torch.randn(8, 4)}):
            pass
