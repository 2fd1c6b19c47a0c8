"""Every configuration shipped for a card is one the tuner's search would try for that key: a search can always
find again what ships, and nothing ships that the launchers were not written to run (8da4w's tiles on the W4A16
kernels up to their split of K, which the search derives from the card)."""
import json
from pathlib import Path

import pytest
import torch

from aofunc.kernels import autotune, int8_int4, nf4, tiles, w4a16, w8a16, w8a8

FILES = sorted(autotune.SHIPPED_DIR.glob("*.json"))
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def normalized(config: dict) -> dict:
    """A config without the settings that mean what their absence means to the launchers (flags off, one loop
    stage)."""
    return {k: v for k, v in config.items() if v is not False and not (k == "LOOP_STAGES" and v == 1)}


def candidates_for(text: str):
    kernel, m, n, k, dtypes = text.split("|")
    m, n, k = (int(part.split("=")[1]) for part in (m, n, k))
    dtype = DTYPES[dtypes.split(",")[0]]
    cpu = torch.device("cpu")
    if kernel.startswith("w4a16_g"):
        group = int(kernel.removeprefix("w4a16_g"))
        # the tables are Hopper cards', whose searches add the wgmma and mma paths where they take the key
        hopper = tiles.wgmma_configs(m, n) if m >= 16 and dtype != torch.float32 and group == 128 else []
        return w4a16.candidate_configs(m, n, k, group, dtype, cpu) + hopper + mma(m, n, k, dtype, group == 128)
    if kernel == "w8a16":
        hopper = tiles.wgmma_configs(m, n) if m >= 16 and dtype != torch.float32 and k % 128 == 0 else []
        return w8a16.candidate_configs(m, n, k, dtype, cpu) + hopper + mma(m, n, k, dtype, k % 128 == 0)
    if kernel.startswith("nf4_b"):
        block = int(kernel.removeprefix("nf4_b").split("_")[0])
        fits = nf4.wgmma_fits(k, block)
        hopper = tiles.wgmma_configs(m, n) if m >= 16 and dtype != torch.float32 and fits else []
        return nf4.candidate_configs(m, n, k, block, dtype, cpu) + hopper + mma(m, n, k, dtype, fits)
    if kernel == "w8a8_linear":
        return w8a8.candidate_configs(m)
    if kernel.startswith("int8_int4_g"):
        group = int(kernel.removeprefix("int8_int4_g"))
        # the GEMV forms start from the card's W4A16 GEMV winner, any of W4A16's GEMV candidates
        w4a16_gemv = [c for c in w4a16.candidate_configs(m, n, k, group, dtype, cpu) if c["path"] == "gemv"]
        pool = (int8_int4.candidate_configs(m, n, k, group, dtype, dtype, cpu)
                + (int8_int4.gemv_candidates(w4a16_gemv, m) if m <= 8 else [])
                + (tiles.wgmma_configs(m, n) if m >= 64 and group == 128 else []))
        return [without_split(c) if c.get("path") in ("gemm", "fp16_gemm") else c for c in pool]
    return None


def mma(m: int, n: int, k: int, dtype: torch.dtype, fits: bool) -> list:
    """The mma path's candidates where a GPU's search adds them (up to 32 rows of 16-bit x, a weight it takes)."""
    return tiles.mma_configs(m, n, k) if m <= tiles.MMA_ROWS and dtype != torch.float32 and fits else []


def without_split(config: dict) -> dict:
    """A W4A16-kernel tile of 8da4w without its split of K, which follows the card's multiprocessor count."""
    return {k: v for k, v in config.items() if k != "SPLIT_K"}


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_shipped_configs_are_search_candidates(path: Path):
    tables = json.loads(path.read_text())["configs"]
    checked = 0
    for device, table in tables.items():
        assert autotune.device_slug(device) == path.stem
        for text, config in table.items():
            pool = candidates_for(text)
            if pool is None:
                continue
            if text.startswith("int8_int4_g") and config.get("path") in ("gemm", "fp16_gemm"):
                config = without_split(config)
            assert normalized(config) in [normalized(c) for c in pool], (text, config)
            checked += 1
    assert checked > 0
