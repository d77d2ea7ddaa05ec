import random

import pytest
import torch

from internvl_aot.runtime import kv_cache
from internvl_aot.runtime.kv_cache import GiB, BlockAllocator, KVPool, OutOfBlocksError


def check_invariants(alloc: BlockAllocator, lens: dict[int, int]):
    """Every block 1..N-1 is either free or in exactly one table; block 0 is in neither;
    each table is exactly as long as its sequence needs."""
    owned = [b for s in lens for b in alloc.block_table(s)]
    free = list(alloc._free)
    assert 0 not in owned and 0 not in free
    assert len(owned) == len(set(owned)), "a block is handed out twice"
    assert len(free) == len(set(free)), "a block is free twice"
    assert set(owned).isdisjoint(free)
    assert sorted(owned + free) == list(range(1, alloc.num_blocks))
    assert alloc.num_free_blocks == len(free)
    for s, n in lens.items():
        assert len(alloc.block_table(s)) == alloc.blocks_needed(n)
        assert alloc.num_tokens(s) == n


def test_allocate_and_free_roundtrip():
    alloc = BlockAllocator(num_blocks=8, block_size=4)
    assert alloc.num_free_blocks == 7
    t1 = alloc.allocate(1, 5)            # 2 blocks
    t2 = alloc.allocate(2, 4)            # exactly 1 block
    assert len(t1) == 2 and len(t2) == 1
    assert 0 not in t1 + t2 and not set(t1) & set(t2)
    assert alloc.num_free_blocks == 4
    check_invariants(alloc, {1: 5, 2: 4})
    alloc.free(1)
    assert alloc.num_free_blocks == 6 and 1 not in alloc
    check_invariants(alloc, {2: 4})
    alloc.free(2)
    assert alloc.num_free_blocks == 7


def test_block_zero_never_handed_out_even_when_full():
    alloc = BlockAllocator(num_blocks=5, block_size=2)
    tables = [alloc.allocate(s, 2) for s in range(4)]
    assert sorted(b for t in tables for b in t) == [1, 2, 3, 4]
    assert not alloc.can_allocate(1)
    with pytest.raises(OutOfBlocksError):
        alloc.allocate(99, 1)


def test_append_slot_grows_at_block_boundary_and_returns_slot():
    bs = 4
    alloc = BlockAllocator(num_blocks=10, block_size=bs)
    alloc.allocate(7, 3)
    assert len(alloc.block_table(7)) == 1
    slot = alloc.append_slot(7, 4)                   # fills block 0 of the table, no growth
    assert len(alloc.block_table(7)) == 1
    assert slot == alloc.block_table(7)[0] * bs + 3
    free_before = alloc.num_free_blocks
    slot = alloc.append_slot(7, 5)                   # position 4 opens a second block
    table = alloc.block_table(7)
    assert len(table) == 2 and alloc.num_free_blocks == free_before - 1
    assert slot == table[1] * bs + 0
    alloc.append_slot(7, 13)                         # a multi-block jump (chunked prefill) grows by 2
    assert len(alloc.block_table(7)) == 4
    with pytest.raises(ValueError):
        alloc.append_slot(7, 12)                     # sequences never shrink


def test_out_of_blocks_leaves_state_unchanged():
    alloc = BlockAllocator(num_blocks=4, block_size=2)
    alloc.allocate(1, 4)                             # 2 of 3 blocks
    with pytest.raises(OutOfBlocksError):
        alloc.allocate(2, 3)                         # needs 2, 1 free
    assert 2 not in alloc and alloc.num_free_blocks == 1
    alloc.append_slot(1, 6)                          # takes the last block
    assert not alloc.can_append(1, 7)
    table = alloc.block_table(1)
    with pytest.raises(OutOfBlocksError):
        alloc.append_slot(1, 7)
    assert alloc.block_table(1) == table and alloc.num_tokens(1) == 6
    check_invariants(alloc, {1: 6})


def test_errors_for_unknown_double_free_and_duplicate():
    alloc = BlockAllocator(num_blocks=4, block_size=2)
    with pytest.raises(KeyError):
        alloc.free(3)
    with pytest.raises(KeyError):
        alloc.block_table(3)
    with pytest.raises(KeyError):
        alloc.append_slot(3, 1)
    alloc.allocate(3, 1)
    with pytest.raises(ValueError):
        alloc.allocate(3, 1)
    alloc.free(3)
    with pytest.raises(KeyError):
        alloc.free(3)
    assert alloc.num_free_blocks == 3
    with pytest.raises(ValueError):
        BlockAllocator(num_blocks=1, block_size=2)


def test_slot_mapping_and_padded_block_table():
    bs = 4
    alloc = BlockAllocator(num_blocks=16, block_size=bs)
    alloc.allocate(0, 3)                             # interleave so tables are not contiguous
    alloc.allocate(1, 10)
    alloc.append_slot(0, 9)
    for seq, n in ((0, 9), (1, 10)):
        table = alloc.block_table(seq)
        slots = alloc.slot_mapping(seq, range(n))
        assert slots == [table[p // bs] * bs + p % bs for p in range(n)]
        assert len(set(slots)) == n and all(s >= bs for s in slots)      # never block 0's slots
        padded = alloc.block_table(seq, pad_to=5)
        assert padded == table + [0] * (5 - len(table))
    assert not set(alloc.slot_mapping(0, range(9))) & set(alloc.slot_mapping(1, range(10)))
    # Slots index the flattened [num_blocks * block_size] axis of the pool.
    pool = KVPool(layers=1, num_blocks=16, block_size=bs, kv_heads=1, head_dim=1, dtype=torch.float32)
    flat = pool.k_cache.view(1, -1, 1, 1)
    slot = alloc.slot_mapping(1, [6])[0]
    flat[0, slot] = 42.0
    table = alloc.block_table(1)
    assert pool.k_cache[0, table[1], 2, 0, 0] == 42.0
    with pytest.raises(IndexError):
        alloc.slot_mapping(1, [12])                  # beyond the 3 allocated blocks
    with pytest.raises(ValueError):
        alloc.block_table(1, pad_to=2)


def test_random_operations_keep_invariants():
    rng = random.Random(0)
    alloc = BlockAllocator(num_blocks=33, block_size=4)
    lens: dict[int, int] = {}
    next_id = 0
    for _ in range(2000):
        op = rng.random()
        if op < 0.35:
            n = rng.randint(1, 40)
            if alloc.can_allocate(n):
                alloc.allocate(next_id, n)
                lens[next_id] = n
            else:
                with pytest.raises(OutOfBlocksError):
                    alloc.allocate(next_id, n)
            next_id += 1
        elif op < 0.8 and lens:
            s = rng.choice(list(lens))
            new_len = lens[s] + rng.choice((1, 1, 1, 5))
            if alloc.can_append(s, new_len):
                slot = alloc.append_slot(s, new_len)
                lens[s] = new_len
                assert slot == alloc.slot_mapping(s, [new_len - 1])[0]
            else:
                with pytest.raises(OutOfBlocksError):
                    alloc.append_slot(s, new_len)
        elif lens:
            s = rng.choice(list(lens))
            alloc.free(s)
            del lens[s]
        check_invariants(alloc, lens)
        all_slots = [x for s, n in lens.items() for x in alloc.slot_mapping(s, range(n))]
        assert len(all_slots) == len(set(all_slots))
    for s in list(lens):
        alloc.free(s)
    assert alloc.num_free_blocks == 32


# ---- KVPool ----

def test_pool_shape_dtype_and_zeroed():
    pool = KVPool(layers=2, num_blocks=5, block_size=4, kv_heads=3, head_dim=8, dtype=torch.bfloat16)
    assert pool.k_cache.shape == pool.v_cache.shape == (2, 5, 4, 3, 8)
    assert pool.k_cache.dtype == torch.bfloat16
    assert pool.k_cache.data_ptr() != pool.v_cache.data_ptr()
    assert not pool.k_cache.any() and not pool.v_cache.any()
    assert pool.nbytes == 2 * 2 * 5 * 4 * 3 * 8 * 2
    assert pool.num_slots == 20


def test_bytes_per_block_arithmetic():
    # 24 layers, 8 KV heads x 128, block 16, bf16: 2 * 24 * 16 * 8 * 128 * 2 bytes
    assert KVPool.bytes_per_block(24, 8, 128, 16, torch.bfloat16) == 1_572_864
    assert KVPool.bytes_per_block(24, 8, 128, 16, torch.float32) == 2 * 1_572_864


def test_from_budget_sizes_pool_from_bytes():
    per = KVPool.bytes_per_block(2, 2, 4, 8, torch.float32)            # 1024 bytes
    assert per == 1024
    pool = KVPool.from_budget(2, 2, 4, 8, torch.float32, "cpu", budget_bytes=10 * per + 100)
    assert pool.num_blocks == 10 and pool.k_cache.shape == (2, 10, 8, 2, 4)
    pool = KVPool.from_budget(2, 2, 4, 8, torch.float32, "cpu", budget_bytes=10 * per, max_blocks=6)
    assert pool.num_blocks == 6
    assert pool.nbytes <= 10 * per


def test_from_budget_too_small_names_the_shortfall():
    per = KVPool.bytes_per_block(2, 2, 4, 8, torch.float32)
    # One 64-token sequence needs 8 blocks + block 0 = 9; the budget holds 8.
    with pytest.raises(ValueError, match=r"holds 8 KV blocks.*64 tokens.*8 blocks plus the reserved block 0"):
        KVPool.from_budget(2, 2, 4, 8, torch.float32, "cpu", budget_bytes=8 * per, blocks_per_seq=8)
    pool = KVPool.from_budget(2, 2, 4, 8, torch.float32, "cpu", budget_bytes=9 * per, blocks_per_seq=8)
    assert pool.num_blocks == 9
    with pytest.raises(ValueError, match="holds 0 KV blocks"):
        KVPool.from_budget(2, 2, 4, 8, torch.float32, "cpu", budget_bytes=per - 1)


def test_from_budget_fraction_of_free(monkeypatch):
    per = KVPool.bytes_per_block(1, 1, 4, 4, torch.float32)            # 128 bytes
    monkeypatch.setattr(kv_cache, "free_memory_bytes", lambda device: 100 * per)
    pool = KVPool.from_budget(1, 1, 4, 4, torch.float32, "cpu", fraction_of_free=0.5)
    assert pool.num_blocks == 50
    # An explicit budget larger than what is free is refused up front, not OOM-killed later.
    with pytest.raises(ValueError, match="free on cpu"):
        KVPool.from_budget(1, 1, 4, 4, torch.float32, "cpu", budget_bytes=200 * per)
    with pytest.raises(ValueError, match="exactly one"):
        KVPool.from_budget(1, 1, 4, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="exactly one"):
        KVPool.from_budget(1, 1, 4, 4, torch.float32, "cpu", budget_bytes=per, fraction_of_free=0.5)
    with pytest.raises(ValueError, match="fraction_of_free"):
        KVPool.from_budget(1, 1, 4, 4, torch.float32, "cpu", fraction_of_free=1.5)


def test_free_memory_on_cpu_is_positive():
    assert 0 < kv_cache.free_memory_bytes("cpu") < 1 << 50
    assert GiB == 1 << 30
