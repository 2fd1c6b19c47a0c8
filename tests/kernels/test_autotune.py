"""The autotuner: keys, the cache files, and a search that rejects wrong or failing candidates."""
import json

import pytest
import torch

from aofunc.kernels import autotune


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AOFUNC_KERNEL_CACHE", str(tmp_path / "kernels.json"))
    monkeypatch.setattr(autotune, "SHIPPED_DIR", tmp_path / "shipped")
    monkeypatch.delenv("AOFUNC_AUTOTUNE", raising=False)
    autotune.forget()
    yield tmp_path
    autotune.forget()


def test_m_bucket_is_next_power_of_two():
    assert [autotune.m_bucket(m) for m in (1, 2, 3, 4, 5, 16, 17, 2048, 2049)] == [1, 2, 4, 4, 8, 16, 32, 2048, 4096]
    with pytest.raises(ValueError, match="m must be >= 1"):
        autotune.m_bucket(0)


def test_key_buckets_m_and_names_dtypes():
    key = autotune.config_key("w4a16", 5, 4096, 11008, (torch.bfloat16, torch.float16), "NVIDIA H100 80GB HBM3")
    assert key == autotune.ConfigKey("w4a16", 8, 4096, 11008, ("bfloat16", "float16"), "NVIDIA H100 80GB HBM3")
    assert str(key) == "w4a16|m=8|n=4096|k=11008|bfloat16,float16"
    assert autotune.config_key("w4a16", 7, 1, 2, (), torch.device("cpu")).device == "cpu"


def test_device_slug():
    assert autotune.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert autotune.device_slug("NVIDIA H200") == "nvidia-h200"


def test_cache_path_follows_environment(monkeypatch, tmp_path):
    assert autotune.cache_path() == tmp_path / "kernels.json"
    monkeypatch.delenv("AOFUNC_KERNEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert autotune.cache_path() == tmp_path / "xdg" / "aofunc" / "kernels.json"


def test_store_then_lookup_survives_a_new_process(tmp_path):
    key = autotune.config_key("k", 1, 8, 8, ("float16",), "card")
    assert autotune.lookup(key) is None
    autotune.store(key, {"BLOCK": 32, "num_warps": 4})
    autotune.forget()  # as a fresh process would: only the file remains
    assert autotune.lookup(key) == {"BLOCK": 32, "num_warps": 4}
    data = json.loads((tmp_path / "kernels.json").read_text())
    assert data == {"version": 1, "configs": {"card": {"k|m=1|n=8|k=8|float16": {"BLOCK": 32, "num_warps": 4}}}}


def test_user_cache_overrides_shipped(tmp_path):
    key = autotune.config_key("k", 3, 8, 8, ("float16",), "Some Card")
    autotune.write_table(tmp_path / "shipped" / "some-card.json", {"Some Card": {str(key): {"BLOCK": 16}}})
    assert autotune.lookup(key) == {"BLOCK": 16}
    autotune.forget()
    autotune.write_table(tmp_path / "kernels.json", {"Some Card": {str(key): {"BLOCK": 64}}})
    assert autotune.lookup(key) == {"BLOCK": 64}


@pytest.mark.parametrize("text", ['{"version": 99, "configs": {}}', "not json {", '["a", "list"]'])
def test_an_unusable_user_cache_is_ignored_with_a_warning_and_left_alone(tmp_path, text):
    path = tmp_path / "kernels.json"
    path.write_text(text)
    key = autotune.config_key("k", 1, 1, 1, (), "card")
    with pytest.warns(UserWarning, match="kernels.json"):
        assert autotune.lookup(key) is None
    with pytest.warns(UserWarning, match="kernels.json"):
        autotune.store(key, {"BLOCK": 8})
    assert autotune.lookup(key) == {"BLOCK": 8}  # kept for this process
    assert path.read_text() == text  # another program's file is never overwritten


def test_malformed_entries_are_dropped_and_the_rest_used(tmp_path):
    good = autotune.config_key("k", 1, 1, 1, (), "card")
    bad = autotune.config_key("k", 2, 1, 1, (), "card")
    autotune.write_table(tmp_path / "kernels.json", {"card": {str(good): {"BLOCK": 4}, str(bad): [1, 2]}})
    with pytest.warns(UserWarning, match="malformed entry"):
        assert autotune.lookup(good) == {"BLOCK": 4}
    assert autotune.lookup(bad) is None


def test_shipped_tables_can_be_switched_off(tmp_path, monkeypatch):
    key = autotune.config_key("k", 1, 8, 8, ("float16",), "Some Card")
    autotune.write_table(tmp_path / "shipped" / "some-card.json", {"Some Card": {str(key): {"BLOCK": 16}}})
    monkeypatch.setenv("AOFUNC_SHIPPED_CONFIGS", "0")
    assert autotune.lookup(key) is None
    autotune.forget()
    monkeypatch.setenv("AOFUNC_SHIPPED_CONFIGS", "1")
    assert autotune.lookup(key) == {"BLOCK": 16}


def _problem():
    """A fake kernel: BLOCK=1 is wrong, BLOCK=3 raises, others are right; the timer reads TIMES of the last run."""
    ref = torch.arange(6.0)
    last = []

    def run(config):
        last.append(config["BLOCK"])
        if config["BLOCK"] == 3:
            raise RuntimeError("out of resources")
        return ref + (1.0 if config["BLOCK"] == 1 else 0.0)

    return ref, run, lambda fn: (fn(), TIMES[last[-1]])[1]


TIMES = {1: 0.1, 2: 2.0, 4: 3.0, 8: 2.0}


def test_search_rejects_wrong_and_failing_candidates():
    ref, run, timer = _problem()
    best, trials = autotune.search([{"BLOCK": b} for b in (8, 1, 3, 2)], run, ref, tolerance=1e-6, timer=timer)
    assert [t.us for t in trials] == [2.0, None, None, 2.0]
    assert trials[1].reason.startswith("relative error")
    assert trials[2].reason == "RuntimeError: out of resources"
    assert best == {"BLOCK": 8}  # equal times: the first one wins


def test_choose_default_without_tuning_and_search_with_it(monkeypatch):
    ref, run, timer = _problem()
    monkeypatch.setattr(autotune, "cold_us", timer)
    key = autotune.config_key("fake", 1, 6, 6, ("float32",), "card")
    searched = []

    def candidates():
        searched.append(True)
        return [{"BLOCK": 1}, {"BLOCK": 2}]

    args = dict(candidates=candidates, run=run, reference=lambda: ref, tolerance=1e-6)
    assert autotune.choose(key, {"BLOCK": 4}, **args) == {"BLOCK": 4} and not searched  # tuning off: no search
    with autotune.tuning():
        assert autotune.choose(key, {"BLOCK": 4}, **args) == {"BLOCK": 2}  # BLOCK=1 is faster but wrong
    assert autotune.lookup(key) == {"BLOCK": 2} and searched == [True]
    with autotune.tuning():
        assert autotune.choose(key, {"BLOCK": 8}, **args) == {"BLOCK": 2} and searched == [True]  # stored: no search
    with autotune.tuning(retune=True):
        assert autotune.choose(key, {"BLOCK": 8}, **args) == {"BLOCK": 8}  # ties go to the default, timed first
    assert autotune.lookup(key) == {"BLOCK": 8}


def test_tuning_lists_the_keys_it_searched_and_verify_discards_a_stale_winner(monkeypatch, tmp_path):
    ref, run, timer = _problem()
    monkeypatch.setattr(autotune, "cold_us", timer)
    key = autotune.config_key("fake", 1, 6, 6, ("float32",), "card")
    args = dict(candidates=lambda: [{"BLOCK": 2}], run=run, reference=lambda: ref, tolerance=1e-6)
    autotune.store(key, {"BLOCK": 1})  # a stored winner that no longer matches the twin
    with autotune.tuning() as searched:
        assert autotune.choose(key, {"BLOCK": 4}, **args) == {"BLOCK": 1}  # trusted without verify
    assert searched == []
    with autotune.tuning(verify=True) as searched, pytest.warns(UserWarning, match="discarding"):
        assert autotune.choose(key, {"BLOCK": 4}, **args) == {"BLOCK": 2}
    assert searched == [key]
    autotune.forget()
    assert autotune.lookup(key) == {"BLOCK": 2}  # the file holds the new winner
    autotune.store(key, {"BLOCK": 3})  # one that no longer launches
    with autotune.tuning(verify=True) as searched, pytest.warns(UserWarning, match="RuntimeError"):
        assert autotune.choose(key, {"BLOCK": 4}, **args) == {"BLOCK": 2}


def test_environment_variable_turns_tuning_on(monkeypatch):
    assert not autotune.tuning_enabled()
    monkeypatch.setenv("AOFUNC_AUTOTUNE", "1")
    assert autotune.tuning_enabled()
    with autotune.tuning(False):
        assert not autotune.tuning_enabled()


def test_choose_raises_when_nothing_matches():
    ref, run, _ = _problem()
    key = autotune.config_key("fake", 1, 6, 6, ("float32",), "card")
    with autotune.tuning(), pytest.raises(RuntimeError, match="no configuration"):
        autotune.choose(key, {"BLOCK": 1}, lambda: [{"BLOCK": 3}], run, lambda: ref, 1e-6)


def test_relative_error():
    a = torch.tensor([3.0, 4.0])
    assert autotune.relative_error(a, a) == 0.0
    assert autotune.relative_error(a * 1.5, a) == pytest.approx(0.5)
    assert autotune.relative_error(torch.tensor([float("nan"), 4.0]), a) == float("inf")


def test_a_16_row_gemm_winner_serves_fewer_rows_when_nothing_is_tuned_for_them():
    # its tiles pad x to 16 rows: the same work for 2, 4 or 8 rows; never for one row, another path's default, a
    # winner of other tiles, or when tuning is on (a search then runs for the key itself)
    gemm = {"path": "gemm", "BLOCK_M": 16, "BLOCK_N": 64}
    autotune.store(autotune.config_key("k", 16, 64, 64, ("bfloat16",), "card"), dict(gemm, SPLIT_K=2))
    default = {"path": "gemm", "BLOCK_M": 16, "BLOCK_N": 32}

    def choose(m, default=default):
        return autotune.choose(autotune.config_key("k", m, 64, 64, ("bfloat16",), "card"), default,
                               candidates=lambda: [], run=None, reference=None, tolerance=0.0)
    assert [choose(m) for m in (2, 3, 5, 8)] == [dict(gemm, SPLIT_K=2)] * 4
    assert choose(1) == default and choose(16) == dict(gemm, SPLIT_K=2)
    assert choose(4, {"path": "gemv", "BLOCK_N": 32}) == {"path": "gemv", "BLOCK_N": 32}
    autotune.store(autotune.config_key("j", 16, 64, 64, ("bfloat16",), "card"), {"path": "gemm", "BLOCK_M": 32})
    assert autotune.choose(autotune.config_key("j", 4, 64, 64, ("bfloat16",), "card"), default, candidates=lambda: [],
                           run=None, reference=None, tolerance=0.0) == default
