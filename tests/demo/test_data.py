import torch

from aofunc.demo import data


def test_source_files_sorted_and_without_tests():
    files = data.source_files()
    assert files == sorted(files)
    assert len(files) > 100
    assert "os.py" in files and "json/decoder.py" in files
    for f in files:
        parts = f.split("/")
        assert not data.EXCLUDED_DIRS.intersection(parts[:-1]), f
        assert not parts[-1].startswith("_sysconfigdata"), f


def test_split_is_disjoint_complete_and_by_path():
    files = data.source_files()
    train, heldout = data.split_files(files)
    assert set(train).isdisjoint(heldout)
    assert sorted(train + heldout) == files
    # 26/256 of the hash space: about a tenth of the files are held out.
    assert 0.05 < len(heldout) / len(files) < 0.15
    # The side of a file depends on its path alone.
    assert all(data.is_heldout(f) for f in heldout)
    assert data.split_files(["x/a.py"] + heldout)[1] == [f for f in ["x/a.py"] + heldout if data.is_heldout(f)]


def test_tokens_joins_files_with_nul(tmp_path):
    (tmp_path / "a.py").write_bytes(b"ab")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "b.py").write_bytes(b"c")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.py").write_bytes(b"zzz")
    files = data.source_files(tmp_path)
    assert files == ["a.py", "pkg/b.py"]
    assert data.tokens(files, tmp_path).tolist() == [97, 98, 0, 99, 0]


def test_windows_are_deterministic_and_in_range():
    stream = torch.arange(100, dtype=torch.uint8)
    w = data.even_windows(stream, 5, 9)
    assert w.shape == (5, 10) and w.dtype == torch.int64
    assert w[0].tolist() == list(range(10)) and w[-1].tolist() == list(range(90, 100))
    a = data.random_batch(stream, 4, 9, torch.Generator().manual_seed(3))
    b = data.random_batch(stream, 4, 9, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (4, 10)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(4, 9, dtype=torch.int64))


def test_bad_input_is_refused():
    import pytest

    with pytest.raises(ValueError, match="heldout_fraction"):
        data.split_files(["a.py"], 1.5)
    with pytest.raises(ValueError, match="too few"):
        data.even_windows(torch.zeros(5, dtype=torch.uint8), 2, 8)
    with pytest.raises(ValueError, match="count"):
        data.even_windows(torch.zeros(50, dtype=torch.uint8), 0, 8)
