"""Tensor-parallel building blocks, gpt-fast / nano-vllm style.

Every linear knows its rank and world size. Column-parallel layers hold a slice of the
output features, row-parallel layers a slice of the input features and all-reduce their
partial sums. The collectives are PyTorch functional collectives, so `torch.export`
records them as graph nodes and AOTInductor compiles them into the artifact. With
world_size 1 the same modules run with the collectives left out.
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


SINGLE = TPInfo()


def all_reduce(x: torch.Tensor, tp: TPInfo) -> torch.Tensor:
    if tp.world_size == 1:
        return x
    y = torch.ops._c10d_functional.all_reduce(x, "sum", tp.group_name)
    return torch.ops._c10d_functional.wait_tensor(y)


def all_gather_last_dim(x: torch.Tensor, tp: TPInfo) -> torch.Tensor:
    """Concatenate the ranks' slices of the last dimension (vocab-parallel logits)."""
    if tp.world_size == 1:
        return x
    y = torch.ops._c10d_functional.all_gather_into_tensor(x.contiguous(), tp.world_size, tp.group_name)
    y = torch.ops._c10d_functional.wait_tensor(y)               # [world * rows, cols], rank-major
    rows = x.shape[0]
    return y.view(tp.world_size, rows, -1).permute(1, 0, 2).reshape(rows, -1)


class ColumnParallelLinear(nn.Module):
    """y[..., shard] = x @ W[shard].T: output features split across ranks, no communication."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPInfo = SINGLE):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(tp.shard(out_features, "out_features"), in_features))
        self.bias = nn.Parameter(torch.empty(self.weight.shape[0])) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Input features split across ranks; the partial products are all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPInfo = SINGLE):
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(out_features, tp.shard(in_features, "in_features")))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce(F.linear(x, self.weight), self.tp)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows of the table split across ranks (vocab padded to a multiple of world size)."""

    def __init__(self, vocab_size: int, dim: int, tp: TPInfo = SINGLE):
        super().__init__()
        self.tp = tp
        self.padded_vocab = -(-vocab_size // tp.world_size) * tp.world_size
        self.per_rank = self.padded_vocab // tp.world_size
        self.weight = nn.Parameter(torch.empty(self.per_rank, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(ids, self.weight)
        start = self.tp.rank * self.per_rank
        local = ids - start
        inside = (local >= 0) & (local < self.per_rank)
        y = F.embedding(torch.where(inside, local, torch.zeros_like(local)), self.weight)
        y = y * inside.unsqueeze(-1).to(y.dtype)
        return all_reduce(y, self.tp)


class ParallelLMHead(nn.Module):
    """Output head split by vocabulary; logits gathered to the full (padded) vocabulary."""

    def __init__(self, dim: int, vocab_size: int, tp: TPInfo = SINGLE):
        super().__init__()
        self.tp = tp
        per_rank = -(-vocab_size // tp.world_size)
        self.weight = nn.Parameter(torch.empty(per_rank, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_gather_last_dim(F.linear(x, self.weight).float(), self.tp)
