import math

import pytest
import torch

from aofunc.demo import checkpoint, data
from aofunc.demo.evaluate import perplexity
from aofunc.demo.train import RECIPES, Recipe, learning_rate, train


@pytest.fixture(scope="module")
def corpus():
    return data.corpus()


@pytest.fixture(scope="module")
def tiny_model(corpus):
    return train(RECIPES["tiny"], corpus[0], progress=False)


def test_training_is_deterministic(corpus, tiny_model):
    again = train(RECIPES["tiny"], corpus[0], progress=False)
    for (name, a), (_, b) in zip(tiny_model.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), name
    other_seed = train(Recipe(RECIPES["tiny"].config, steps=2, batch_size=2, seq_len=16, warmup=1, seed=1), corpus[0], progress=False)
    assert not torch.equal(other_seed.embed.weight, tiny_model.embed.weight)


def test_trained_tiny_model_beats_the_uniform_guess_on_heldout_files(corpus, tiny_model):
    windows = data.even_windows(corpus[1], 16, 64)
    untrained = train(Recipe(RECIPES["tiny"].config, steps=1, batch_size=1, seq_len=8, warmup=0, lr=0.0), corpus[0], progress=False)
    ppl = perplexity(tiny_model, dict(tiny_model.named_parameters()), windows, progress=False)
    ppl0 = perplexity(untrained, dict(untrained.named_parameters()), windows, progress=False)
    assert abs(ppl0 - 256) < 10  # an untrained model is close to uniform over bytes
    assert ppl < 40


def test_learning_rate_warms_up_then_decays_to_the_floor():
    r = Recipe(steps=110, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert learning_rate(r, 0) == pytest.approx(0.1)
    assert learning_rate(r, 9) == pytest.approx(1.0)
    assert learning_rate(r, 10) == pytest.approx(1.0)
    assert learning_rate(r, 60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert learning_rate(r, 110) == pytest.approx(0.1)


def test_checkpoint_round_trip_and_cache(tmp_path, monkeypatch, tiny_model):
    path = tmp_path / "m.safetensors"
    checkpoint.save(tiny_model, RECIPES["tiny"], path, train_seconds=1.5)
    model, recipe, meta = checkpoint.load(path)
    assert recipe == RECIPES["tiny"] and meta["train_seconds"] == "1.5"
    for (name, a), (_, b) in zip(tiny_model.named_parameters(), model.named_parameters()):
        assert torch.equal(a.half().float(), b), name
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary left behind

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cached = checkpoint.cache_path(RECIPES["tiny"], "tiny")
    assert cached.parent == tmp_path / "cache" / "aofunc" and "py3" in cached.name
    cached.parent.mkdir(parents=True)
    path.rename(cached)
    model, _, source = checkpoint.pretrained("tiny", progress=False)
    assert source.startswith("cached")


def test_bad_checkpoints_are_refused(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="not a file"):
        checkpoint.load(tmp_path / "missing.safetensors")
    save_file({"x": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a demo checkpoint"):
        checkpoint.load(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="size must be one of"):
        checkpoint.pretrained("huge")


def test_shipped_checkpoint_is_small_matches_its_recipe_and_predicts_heldout_code(corpus):
    path = checkpoint.SHIPPED["small"]
    assert path.stat().st_size <= 5_000_000
    model, recipe, meta = checkpoint.load(path)
    assert recipe == RECIPES["small"]
    assert {"python", "torch", "device", "train_seconds"} <= meta.keys()
    ppl = perplexity(model, dict(model.named_parameters()), data.even_windows(corpus[1], 8, 128), progress=False)
    assert ppl < 4.0  # bytes of unseen standard-library files, against 256 for a uniform guess


def test_the_demo_modules_import_each_other_without_a_cycle():
    """Every import between aofunc.demo's modules, at the top or inside a function, points one way."""
    import ast
    from pathlib import Path

    import aofunc.demo

    folder = Path(aofunc.demo.__file__).parent
    modules = {path.stem for path in folder.glob("*.py")}
    graph = {}
    for path in folder.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "aofunc.demo":
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aofunc.demo."):
                imported.add(node.module.split(".")[2])
            elif isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[2] for alias in node.names
                             if alias.name.startswith("aofunc.demo.")}
        graph[path.stem] = (imported & modules) - {path.stem}
    assert "checkpoint" in graph["run"] and "train" in graph["checkpoint"]

    def visit(module, path):
        assert module not in path, f"import cycle: {' -> '.join(path + [module])}"
        for other in graph[module]:
            visit(other, path + [module])

    for module in graph:
        visit(module, [])
