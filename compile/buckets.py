"""Static shape buckets: which graphs an artifact contains.

Defaults keep the graph count small (2 vision + 4 prefill + 8 decode = 14 graphs):
- vision tiles (1, 4): an image's tiles run in chunks of 4 and then 1, so 13 tiles are
  4+4+4+1 with no padded tile ever computed.
- prefill chunk tokens (64, 512): a prompt is prefilled in chunks that attend to the cache
  (earlier chunks) and themselves, so a 3,400-token prompt costs 7 chunk calls and pads at
  most 511 tokens; 64 keeps short text prompts cheap. Each chunk size comes once per context
  bucket that can hold it (prefill_t{T}_c{C}): a chunk attends over C keys, so the first chunks
  of a prompt do not pay for the largest context (measured, 2B, 512-token chunk: attention over
  4,096 keys ~250 ms per layer against ~60 ms over 1,024). CPU artifacts at TP = 1 take any chunk
  length up to the bucket's T (compile/export.py `dynamic_tokens`): no chunk computes padding there.
- decode batch (1, 2, 4, 8) x context (1024, 4096): decode reads all weights every step,
  so padding the batch costs little; the context bucket bounds the K/V gathered per step.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from ..runtime.buckets import all_keys


@dataclass
class Buckets:
    vision: tuple[int, ...] = (1, 4)
    prefill: tuple[int, ...] = (64, 512)
    batch: tuple[int, ...] = (1, 2, 4, 8)
    context: tuple[int, ...] = (1024, 4096)
    block_size: int = 32

    def __post_init__(self):
        for name in ("vision", "prefill", "batch", "context"):
            values = tuple(sorted(int(v) for v in getattr(self, name)))
            if not values or values[0] < 1:
                raise ValueError(f"bucket list {name!r} must hold positive sizes, got {values}")
            setattr(self, name, values)
        bad = [c for c in self.context if c % self.block_size]
        if bad:
            raise ValueError(f"context buckets {bad} are not multiples of block_size {self.block_size}")
        if self.prefill[-1] > self.context[-1]:
            raise ValueError("the largest prefill chunk exceeds the largest context bucket")

    @property
    def max_context(self) -> int:
        return self.context[-1]

    def graph_names(self) -> list[str]:
        return [k.name() for k in all_keys(self.vision, self.prefill, self.batch, self.context)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def parse(cls, spec: str | None) -> "Buckets":
        """'vision=1,4;prefill=64,512;batch=1,2,4,8;context=1024,4096;block_size=32' (any subset)."""
        if not spec:
            return cls()
        kw = {}
        for part in filter(None, (p.strip() for p in spec.split(";"))):
            key, _, vals = part.partition("=")
            key = key.strip()
            if key not in cls.__dataclass_fields__:
                raise ValueError(f"unknown bucket kind {key!r} in {spec!r}")
            nums = tuple(int(v) for v in vals.split(",") if v.strip())
            kw[key] = nums[0] if key == "block_size" else nums
        return cls(**kw)
