"""Tensor-parallel building blocks, gpt-fast / nano-vllm style.

Every linear knows its rank and world size. Column-parallel layers hold a slice of the
output features, row-parallel layers a slice of the input features and all-reduce their
partial sums. The collectives are PyTorch functional collectives, so `torch.export`
records them as graph nodes and AOTInductor compiles them into the artifact. With
world_size 1 the same modules run with the collectives left out (and the same ops as
plain nn.Linear / nn.Embedding, so a world-size-1 graph is exactly the untouched model).

Only `all_reduce` is used inside graphs, also for the vocabulary "gather": torch 2.13's
AOTInductor has C shims for `all_reduce`/`wait_tensor` only; other collectives go through
its proxy executor, which deadlocks under gloo (the gloo worker thread needs the GIL that a
running AOTInductor graph holds). Each rank writes its logits into its own slot of a zeroed
[B, world, per_rank] tensor and the sum over ranks is the concatenation (adding zeros is exact).

Rank-dependent values (the vocabulary offset) are persistent buffers, i.e. weights, not
constants baked into the code: every rank's graph is then the same program, compiled once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TPInfo:
    rank: int = 0
    world_size: int = 1
    group_name: str = ""          # name of the registered process group (functional collectives)

    def shard(self, n: int, what: str) -> int:
        if n % self.world_size:
            raise ValueError(f"{what}={n} does not divide by tensor-parallel size {self.world_size}")
        return n // self.world_size

    def padded(self, n: int) -> int:
        """n rounded up to a multiple of the world size (zero-padded heads, features or vocabulary)."""
        return -(-n // self.world_size) * self.world_size

    def kv_heads(self, num_kv_heads: int) -> int:
        """KV heads one rank holds: its share, or one replicated head when there are fewer KV heads
        than ranks (docs/CONTRACTS.md, tensor parallelism)."""
        return max(1, num_kv_heads // self.world_size)


SINGLE = TPInfo()


def all_reduce(x: torch.Tensor, tp: TPInfo) -> torch.Tensor:
    if tp.world_size == 1:
        return x
    y = torch.ops._c10d_functional.all_reduce(x, "sum", tp.group_name)
    return torch.ops._c10d_functional.wait_tensor(y)


class ColumnParallelLinear(nn.Module):
    """y[..., shard] = x @ W[shard].T: output features split across ranks, no communication."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPInfo = SINGLE):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(tp.shard(out_features, "out_features"), in_features))
        self.bias = nn.Parameter(torch.empty(self.weight.shape[0])) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Input features split across ranks; the partial products are all-reduced, the bias added once after."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPInfo = SINGLE):
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(out_features, tp.shard(in_features, "in_features")))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.linear(x, self.weight, self.bias)
        y = all_reduce(F.linear(x, self.weight), self.tp)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows of the table split across ranks (vocab padded to a multiple of world size).

    Each rank looks up the ids in its row range, zeroes the others, and the all-reduce sums
    the one non-zero contribution per token. `vocab_start` ([1] int64, a weight of the rank)
    is this rank's first row.
    """

    def __init__(self, vocab_size: int, dim: int, tp: TPInfo = SINGLE):
        super().__init__()
        self.tp = tp
        self.padded_vocab = tp.padded(vocab_size)
        self.per_rank = self.padded_vocab // tp.world_size
        self.weight = nn.Parameter(torch.empty(self.per_rank, dim))
        if tp.world_size > 1:
            self.register_buffer("vocab_start", torch.zeros(1, dtype=torch.long))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        inside = (local >= 0) & (local < self.per_rank)
        y = F.embedding(torch.where(inside, local, torch.zeros_like(local)), self.weight)
        y = y * inside.unsqueeze(-1).to(y.dtype)
        return all_reduce(y, self.tp)


class ParallelLMHead(nn.Module):
    """Output head split by vocabulary; logits of all ranks combined, padding columns cut off.

    `rank_slot` ([1] int64, a weight of the rank) is this rank's index among the ranks.
    The result is [B, vocab_size] fp32 whatever the world size, so padded logits never
    leave the graph (and can never be sampled).
    """

    def __init__(self, dim: int, vocab_size: int, tp: TPInfo = SINGLE):
        super().__init__()
        self.tp, self.vocab_size = tp, vocab_size
        self.per_rank = tp.padded(vocab_size) // tp.world_size
        self.weight = nn.Parameter(torch.empty(self.per_rank, dim))
        if tp.world_size > 1:
            self.register_buffer("rank_slot", torch.zeros(1, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = F.linear(x, self.weight)
        if self.tp.world_size == 1:
            return local.float()
        rows = local.shape[0]
        slots = local.new_zeros(rows, self.tp.world_size, self.per_rank)
        slots = slots.index_copy(1, self.rank_slot, local.unsqueeze(1))
        # The reduced buffer is 3-D and the output 2-D: the graph output is a view or a new
        # tensor, never the collective's own buffer (see compile/tp.py, check_outputs).
        full = all_reduce(slots, self.tp).reshape(rows, -1)
        return full[:, :self.vocab_size].float()

