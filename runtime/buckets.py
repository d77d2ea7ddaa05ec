"""Graph keys and the bucket policy: which compiled graph runs a piece of work.

Every graph of an artifact is one `GraphKey` (docs/CONTRACTS.md): `vision_n{N}` (N tiles),
`prefill_t{T}_c{C}` (a chunk of T tokens whose keys lie in the first C positions) and
`decode_b{B}_c{C}` (B sequences of up to C tokens). `name()` and `parse()` are the only places
that spell those names. The choice functions below are pure: they look at bucket sizes only,
so the scheduler (which plans) and the model runner (which pads and calls) agree by construction.
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Optional

try:
    import torch
except ImportError:         # only the ONNX runtime installed (runtime/onnx/): no torch on this box
    torch = None

_PATTERNS = {"vision": re.compile(r"vision_n(\d+)"), "prefill": re.compile(r"prefill_t(\d+)_c(\d+)"),
             "decode": re.compile(r"decode_b(\d+)_c(\d+)")}


@dataclass(frozen=True, order=True)
class GraphKey:
    stage: str                    # "vision" | "prefill" | "decode"
    size: int                     # tiles (vision), chunk tokens (prefill), batch rows (decode)
    context: Optional[int] = None  # context bucket (prefill, decode); None for vision

    def name(self) -> str:
        if self.stage == "vision":
            return f"vision_n{self.size}"
        if self.stage == "prefill":
            return f"prefill_t{self.size}_c{self.context}"
        if self.stage == "decode":
            return f"decode_b{self.size}_c{self.context}"
        raise ValueError(f"unknown stage {self.stage!r}")

    @classmethod
    def parse(cls, name: str) -> "GraphKey":
        for stage, pattern in _PATTERNS.items():
            m = pattern.fullmatch(name)
            if m:
                nums = [int(g) for g in m.groups()]
                return cls(stage, nums[0], nums[1] if len(nums) > 1 else None)
        raise ValueError(f"not a graph name: {name!r} (expected vision_n<N>, prefill_t<T>_c<C> or decode_b<B>_c<C>)")


def all_keys(vision, prefill, batch, context) -> list[GraphKey]:
    """Every graph an artifact with these buckets holds (a prefill chunk only in contexts >= T)."""
    return ([GraphKey("vision", n) for n in vision]
            + [GraphKey("prefill", t, c) for t in prefill for c in context if c >= t]
            + [GraphKey("decode", b, c) for b in batch for c in context])


# The block-table input of each stage's graph (graph_inputs below), [rows, blocks per sequence].
BLOCK_TABLE_INPUT = {"prefill": "block_table", "decode": "block_tables"}


def graph_inputs(key: GraphKey, *, hidden: int, image_size: int, block_size: int,
                 dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """The inputs of graph `key` in call order, the two KV-cache tensors (which every prefill and
    decode graph takes last) left out: what export traces, the model runner fills and the TP step
    channel sends (docs/CONTRACTS.md)."""
    i64 = torch.long
    if key.stage == "vision":
        return [("pixel_values", dtype, (key.size, 3, image_size, image_size))]
    mb = key.context // block_size
    if key.stage == "prefill":
        t = key.size
        return [("input_ids", i64, (t,)), ("positions", i64, (t,)), ("image_embeds", dtype, (t, hidden)),
                ("image_mask", torch.bool, (t,)), ("slot_mapping", i64, (t,)), (BLOCK_TABLE_INPUT["prefill"], i64, (1, mb)),
                ("last_index", i64, (1,))]
    b = key.size
    return [("input_ids", i64, (b,)), ("positions", i64, (b,)), ("slot_mapping", i64, (b,)),
            (BLOCK_TABLE_INPUT["decode"], i64, (b, mb))]


def check_signatures(graphs: dict, spec) -> None:
    """Each compiled graph's recorded inputs must be what the runtime will pass it (graph_inputs plus
    the KV pool `[layers, blocks, block_size, rank KV heads, head_dim]` in the spec's dtype): a
    manifest whose block size, dims or dtype disagree with its graphs is refused here, not met as
    an out-of-bounds write. Graphs without a recorded signature (eager modules) are skipped."""
    from .errors import ArtifactError
    kv = ("kv_cache", spec.torch_dtype, (spec.llm.num_layers, None, spec.buckets.block_size, spec.rank_kv_heads,
                                         spec.llm.head_dim))
    for name, g in graphs.items():
        have = getattr(g, "input_signature", None)
        if have is None:
            continue
        key = GraphKey.parse(name)
        want = graph_inputs(key, hidden=spec.llm.hidden_size, image_size=spec.vision_image_size,
                            block_size=spec.buckets.block_size, dtype=spec.torch_dtype)
        if key.stage != "vision":
            want = want + [kv, kv]
        if len(have) != len(want):
            raise ArtifactError(f"graph {name} takes {len(have)} inputs, the manifest implies {len(want)}: re-compile")
        for (n, dt, shape), (_, hdt, hshape) in zip(want, have):
            if hdt != dt or len(hshape) != len(shape) or any(
                    w is not None and h is not None and w != h for w, h in zip(shape, hshape)):
                raise ArtifactError(f"graph {name}: input {n} was compiled as {hdt} {list(hshape)} but the manifest "
                                    f"implies {dt} {list(shape)} (block_size {spec.buckets.block_size}): the "
                                    f"manifest does not match its graphs; re-compile the artifact")


def smallest_at_least(buckets: list[int], n: int) -> int | None:
    i = bisect.bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else None


class BucketPolicy:
    """The artifact's bucket sizes and how work is cut into them."""

    CALL_COST = 32   # per-call overhead of a prefill chunk, in token-equivalents (weights re-read)

    def __init__(self, buckets):
        """buckets: runtime/spec.py BucketSpec (or anything with its five fields)."""
        self.vision = sorted(buckets.vision)
        self.prefill = sorted(buckets.prefill)
        self.batch = sorted(buckets.batch)
        self.context = sorted(buckets.context)
        self.block_size = int(buckets.block_size)
        # Every prefill graph takes chunks of any length up to its T (set by the model runner from the
        # graphs' signatures): a chunk then costs its own tokens, not its bucket's.
        self.exact_chunks = False

    @property
    def max_context(self) -> int:
        return self.context[-1]

    @property
    def max_batch(self) -> int:
        return self.batch[-1]

    def vision_chunk(self, left: int) -> int:
        """Tiles bucket for the next vision call: the largest that fits the `left` tiles, or, when
        none fits, the smallest (padded)."""
        fitting = [b for b in self.vision if b <= left]
        return fitting[-1] if fitting else self.vision[0]

    def prefill_chunk(self, left: int) -> int:
        """Chunk size for the next prefill call: full largest chunks first, then the bucket that
        pads the rest least, counting each extra call as CALL_COST tokens of work (with exact chunks,
        the smallest bucket that holds the rest: no padding is computed)."""
        largest = self.prefill[-1]
        if left >= largest:
            return largest
        if self.exact_chunks:
            return smallest_at_least(self.prefill, left)
        return min(self.prefill, key=lambda b: (-(-left // b) * (b + self.CALL_COST), -b))

    def prefill_keys(self) -> list[GraphKey]:
        return [k for k in all_keys(self.vision, self.prefill, self.batch, self.context) if k.stage == "prefill"]

    def prefill_key(self, t: int, end: int) -> GraphKey:
        """The graph for a chunk of t tokens ending at sequence length `end`: the smallest context
        bucket that holds the chunk's keys and has a graph for this chunk size."""
        for c in self.context:
            if c >= end and c >= t:
                return GraphKey("prefill", t, c)
        raise ValueError(f"a prefill chunk ending at {end} exceeds the largest context bucket {self.max_context}")

    def decode_key(self, batch: int, longest: int) -> GraphKey:
        b = smallest_at_least(self.batch, batch)
        c = smallest_at_least(self.context, longest)
        if b is None or c is None:
            raise ValueError(f"decode batch {batch} / context {longest} exceeds the artifact's buckets "
                             f"(batch {self.batch}, context {self.context})")
        return GraphKey("decode", b, c)
