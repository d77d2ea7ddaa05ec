"""Paged KV cache: the pool of K/V blocks (`KVPool`) and who owns which block (`BlockAllocator`).

Layout (docs/CONTRACTS.md): `k_cache` and `v_cache` are each
`[layers, num_blocks, block_size, kv_heads, head_dim]`; token `p` of a sequence lives in block
`table[p // block_size]` at offset `p % block_size`, i.e. flat slot `block_id * block_size + offset`.
Block 0 is the padding sink: padded tokens write there and padded batch rows read it, so it is
never handed to a sequence. Under tensor parallelism each rank has its own pool with its share of
the KV heads; the block tables are the same on every rank, so one allocator serves them all.
"""
from __future__ import annotations

import os
from collections import deque
from typing import Iterable

try:
    import torch
except ImportError:         # only the ONNX runtime installed (runtime/onnx/): no torch on this box
    torch = None

GiB = 1 << 30


class OutOfBlocksError(RuntimeError):
    """Not enough free blocks. The scheduler never lets it happen (it checks `can_allocate` / `can_append`
    first and preempts); a caller that skips those checks gets this, with the allocator unchanged."""


class KVPool:
    """The K and V tensors of one rank, allocated once and passed to every graph.

    They are zero-filled on purpose. Writing every page commits the memory up front (a lazily
    mapped CPU allocation could otherwise be OOM-killed in the middle of a request, long after
    start-up said it fitted), and zeros keep never-written slots finite: attention reads whole
    blocks and masks the tail, and a masked NaN from uninitialised memory still poisons the sum
    (0 * NaN = NaN). The cost is one memset at start-up.
    """

    def __init__(self, layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: "torch.dtype | None" = None, device: torch.device | str = "cpu"):
        dtype = torch.bfloat16 if dtype is None else dtype
        if num_blocks < 2:
            raise ValueError(f"a KV pool needs at least 2 blocks (block 0 is the padding sink), got {num_blocks}")
        self.layers, self.num_blocks, self.block_size = layers, num_blocks, block_size
        self.kv_heads, self.head_dim, self.dtype = kv_heads, head_dim, dtype
        self.device = torch.device(device)
        shape = (layers, num_blocks, block_size, kv_heads, head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)

    @staticmethod
    def bytes_per_block(layers: int, kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
        """Bytes one block costs across all layers, K and V together."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * layers * block_size * kv_heads * head_dim * itemsize

    @property
    def nbytes(self) -> int:
        return self.k_cache.nbytes + self.v_cache.nbytes

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @classmethod
    def from_budget(cls, layers: int, kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                    device: torch.device | str = "cpu", budget_bytes: int | None = None,
                    fraction_of_free: float | None = None, max_blocks: int | None = None,
                    blocks_per_seq: int = 1) -> "KVPool":
        """A pool as large as the budget allows.

        The budget is either `budget_bytes` (e.g. `--kv-cache-gb` * GiB) or `fraction_of_free` of the
        memory free on `device` right now (call it after the weights are loaded). `max_blocks` caps
        the total block count (block 0 included). `blocks_per_seq` is what one maximum-length
        sequence needs; a budget that cannot hold it plus block 0 is refused with an error that
        says by how much it falls short.
        """
        device = torch.device(device)
        if (budget_bytes is None) == (fraction_of_free is None):
            raise ValueError("give exactly one of budget_bytes and fraction_of_free")
        per_block = cls.bytes_per_block(layers, kv_heads, head_dim, block_size, dtype)
        free = free_memory_bytes(device)
        if fraction_of_free is not None:
            if not 0.0 < fraction_of_free <= 1.0:
                raise ValueError(f"fraction_of_free must be in (0, 1], got {fraction_of_free}")
            budget_bytes = int(free * fraction_of_free)
            source = f"{fraction_of_free:.0%} of the {free / GiB:.2f} GiB free on {device}"
        else:
            if budget_bytes <= 0:
                raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
            source = f"the KV budget of {budget_bytes / GiB:.2f} GiB"

        num_blocks = budget_bytes // per_block
        if max_blocks is not None:
            num_blocks = min(num_blocks, max_blocks)
        needed = blocks_per_seq + 1                      # + the padding sink
        if num_blocks < needed:
            raise ValueError(
                f"{source} holds {num_blocks} KV blocks of {block_size} tokens "
                f"({per_block / (1 << 20):.2f} MiB each, {layers} layers x {kv_heads} KV heads x {head_dim} "
                f"x {dtype}), but one sequence of up to {blocks_per_seq * block_size} tokens needs "
                f"{blocks_per_seq} blocks plus the reserved block 0, i.e. {needed * per_block / GiB:.3f} GiB: "
                f"raise the KV budget (--kv-cache-gb) or lower the maximum sequence length")
        if num_blocks * per_block > free:
            raise ValueError(
                f"a KV pool of {num_blocks} blocks needs {num_blocks * per_block / GiB:.2f} GiB but only "
                f"{free / GiB:.2f} GiB is free on {device}: lower the KV budget (--kv-cache-gb)")
        return cls(layers, num_blocks, block_size, kv_heads, head_dim, dtype, device)


def free_memory_bytes(device: torch.device | str) -> int:
    """Memory that can be allocated on `device` now: accelerator free memory, or for the CPU
    /proc/meminfo's MemAvailable bounded by the cgroup limit (containers see the host's meminfo)."""
    if torch is None and str(device) == "cpu":    # the torch-free ONNX engine
        device = None
    else:
        device = torch.device(device)
    if device is not None and device.type != "cpu":
        backend = getattr(torch, device.type, None)
        if backend is None or not hasattr(backend, "mem_get_info"):
            raise RuntimeError(f"cannot query free memory on {device}: pass an explicit KV budget")
        return int(backend.mem_get_info(device)[0])
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        raise RuntimeError("cannot read MemAvailable from /proc/meminfo: pass an explicit KV budget")
    limit = _cgroup_headroom()
    return available if limit is None else min(available, limit)


def _cgroup_headroom() -> int | None:
    """cgroup v2 `memory.max - memory.current`, or None when there is no limit."""
    base = "/sys/fs/cgroup"
    try:
        with open(os.path.join(base, "memory.max")) as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open(os.path.join(base, "memory.current")) as f:
            current = int(f.read().strip())
        return max(int(limit) - current, 0)
    except (OSError, ValueError):
        return None


class BlockAllocator:
    """Free list of block ids 1..num_blocks-1 and one block table per sequence.

    Pure bookkeeping on Python ints; it never touches the KV tensors. Every mutation either
    completes or raises before changing anything, so a caught `OutOfBlocksError` leaves the
    allocator as it was.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"need at least 2 blocks (block 0 is the padding sink), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: deque[int] = deque(range(1, num_blocks))
        self._tables: dict[int, list[int]] = {}
        self._lens: dict[int, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) <= len(self._free)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def num_tokens(self, seq_id: int) -> int:
        return self._lens[self._known(seq_id)]

    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        """Give a new sequence enough blocks for its first `num_tokens` tokens; returns its table."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id} already has blocks")
        if num_tokens < 1:
            raise ValueError(f"a sequence needs at least one token, got {num_tokens}")
        self._tables[seq_id] = self._take(self.blocks_needed(num_tokens))
        self._lens[seq_id] = num_tokens
        return list(self._tables[seq_id])

    def can_append(self, seq_id: int, new_len: int) -> bool:
        table = self._tables[self._known(seq_id)]
        return self.blocks_needed(new_len) - len(table) <= len(self._free)

    def append_slot(self, seq_id: int, new_len: int) -> int:
        """The sequence now holds `new_len` tokens: grow its table if a block filled up.
        Returns the slot of the last token (position new_len - 1), where decode writes its K/V."""
        table = self._tables[self._known(seq_id)]
        if new_len < self._lens[seq_id]:
            raise ValueError(f"sequence {seq_id} cannot shrink from {self._lens[seq_id]} to {new_len} tokens")
        missing = self.blocks_needed(new_len) - len(table)
        if missing > 0:
            table.extend(self._take(missing))
        self._lens[seq_id] = new_len
        pos = new_len - 1
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def free(self, seq_id: int) -> None:
        table = self._tables.pop(self._known(seq_id))
        del self._lens[seq_id]
        self._free.extend(table)

    def block_table(self, seq_id: int, pad_to: int | None = None) -> list[int]:
        """The sequence's block ids, padded with the sink block 0 up to `pad_to` entries."""
        table = self._tables[self._known(seq_id)]
        if pad_to is None:
            return list(table)
        if len(table) > pad_to:
            raise ValueError(f"sequence {seq_id} has {len(table)} blocks, more than pad_to={pad_to}")
        return table + [0] * (pad_to - len(table))

    def slot_mapping(self, seq_id: int, positions: Iterable[int]) -> list[int]:
        """Flat slot index `block_id * block_size + offset` of each token position."""
        table = self._tables[self._known(seq_id)]
        bs, capacity = self.block_size, len(table) * self.block_size
        slots = []
        for p in positions:
            if not 0 <= p < capacity:
                raise IndexError(f"position {p} of sequence {seq_id} is outside its {capacity} allocated slots")
            slots.append(table[p // bs] * bs + p % bs)
        return slots

    def _known(self, seq_id: int) -> int:
        if seq_id not in self._tables:
            raise KeyError(f"sequence {seq_id} has no blocks (never allocated, or already freed)")
        return seq_id

    def _take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocksError(f"need {n} KV blocks, {len(self._free)} of {self.num_blocks - 1} are free")
        return [self._free.popleft() for _ in range(n)]
