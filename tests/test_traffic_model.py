"""The traffic model's sector counting (bench/traffic_model.py) on cases small enough to count by hand."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import traffic_model as tm  # noqa: E402


def test_contiguous_streams_round_up_to_whole_sectors():
    assert [tm.contiguous_sectors(b) for b in (0, 1, 32, 33, 64, 100)] == [0, 1, 1, 2, 2, 4]


def test_scattered_sectors_fp32_and_bf16():
    idx = np.array([0, 7, 8, 15, 16, 17, 40], dtype=np.int32)
    # fp32, 8 per sector: {0, 7} -> 0, {8, 15} -> 1, {16, 17} -> 2, {40} -> 5; none covers its sector
    assert tm.scattered_sectors(idx, 4) == (4, 0)
    # bf16, 16 per sector: {0..15} -> 0 (4 entries of 16), {16, 17} -> 1, {40} -> 2
    assert tm.scattered_sectors(idx, 2) == (3, 0)
    full = np.arange(8, 24, dtype=np.int32)  # fp32 sectors 1 and 2 entirely
    assert tm.scattered_sectors(full, 4) == (2, 2)
    assert tm.scattered_sectors(full, 2) == (2, 0)  # bf16: 8..15 is half of sector 0, 16..23 half of 1


def test_bf16_full_sector_needs_sixteen_entries():
    assert tm.scattered_sectors(np.arange(16, 32, dtype=np.int32), 2) == (1, 1)
    assert tm.scattered_sectors(np.arange(16, 31, dtype=np.int32), 2) == (1, 0)


def test_one_weight_fp32_dense_grad():
    # k = 10 entries in fp32 sectors 0 (entries 0..7) and 3 (entry 24, 25): weight and dense grad
    # touch 2 sectors each; idx (40 B), moments (40 B each) are 2 sectors apiece.
    idx = np.array([0, 1, 2, 3, 4, 5, 6, 7, 24, 25], dtype=np.int32)
    t = tm.sparse_weight_traffic(idx, 4, "dense", master=False)
    assert t == {"read_idx": 2, "read_grad": 2, "read_exp_avg": 2, "write_exp_avg": 2, "read_exp_avg_sq": 2,
                 "write_exp_avg_sq": 2, "read_master": 0, "write_master": 0, "read_weight": 2, "write_weight": 2,
                 "fill_weight": 0}


def test_one_weight_bf16_master_gathered_grad_fills_partial_sectors():
    # bf16: entries 0..7 and 24, 25 are all in sector 0 and 1 of 16 each; neither is covered whole,
    # so writing the weight without reading it fills both from DRAM.
    idx = np.array([0, 1, 2, 3, 4, 5, 6, 7, 24, 25], dtype=np.int32)
    t = tm.sparse_weight_traffic(idx, 2, "gathered", master=True)
    assert t["read_grad"] == 2  # 10 fp32 = 40 B contiguous
    assert (t["read_weight"], t["write_weight"], t["fill_weight"]) == (0, 2, 2)
    assert (t["read_master"], t["write_master"]) == (2, 2)
    covered = tm.sparse_weight_traffic(np.arange(32, dtype=np.int32), 2, "gathered", master=True)
    assert (covered["write_weight"], covered["fill_weight"]) == (2, 0)


def test_step_totals_table_and_dense_baseline():
    idx = np.arange(0, 2048, 2, dtype=np.int32)  # k = 1024 of a 64 x 64 fp32 weight, every other entry
    t = tm.step_traffic([(idx, 4096)], 4, "dense", False, block=1024, row=9)
    # per fp32 vector of 1024: 128 sectors; scattered: entries 0..2046 span 256 sectors
    assert t["streams_sectors"]["read_table"] == 3  # (1 block + 9 fields) * 8 B = 80 B
    assert t["read_sectors"] == 128 + 256 + 128 + 128 + 256 + 3
    assert t["write_sectors"] == 128 + 128 + 256
    assert t["fill_sectors"] == 0
    assert t["dense_bytes"] == 7 * 4096 * 4  # read w, g, m, v; write w, m, v
    assert t["ratio_to_dense"] == pytest.approx((899 + 512) / (7 * 512))


def test_dense_grad_requires_a_known_mode():
    with pytest.raises(ValueError):
        tm.sparse_weight_traffic(np.arange(4, dtype=np.int32), 4, "sparse", master=False)


def test_sector_sharing_against_uniform_random():
    # 64 of 1024 fp32 entries: uniformly random ones would touch 128 * (1 - (15/16)^8) = 51.6 sectors
    expected = 128 * (1 - (15 / 16) ** 8)
    clustered = [("w", np.arange(64, dtype=np.int32), 1024)]  # 8 full sectors
    spread = [("w", np.arange(0, 1024, 16, dtype=np.int32), 1024)]  # one entry in each of 64 sectors
    assert tm.sector_sharing(clustered) == pytest.approx(8 / expected)
    assert tm.sector_sharing(spread) == pytest.approx(64 / expected)
