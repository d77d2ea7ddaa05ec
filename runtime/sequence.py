"""A request's state as it moves through the engine."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Optional

try:
    import torch
except ImportError:         # only the ONNX runtime installed (runtime/onnx/): no torch on this box
    torch = None

from .sampler import SamplingParams

_ids = itertools.count()


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    pixel_values: Optional[torch.Tensor] = None      # [tiles, 3, 448, 448], dropped after the vision stage
    num_tiles: list[int] = field(default_factory=list)
    on_token: Optional[Callable[["Sequence", int], None]] = None
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: Optional[str] = None               # "stop" | "length" | "cancelled" | "error"
    image_embeds: Optional[torch.Tensor] = None       # [image tokens, hidden], once every tile is encoded
    tiles_encoded: int = 0                            # tiles through the vision graphs so far
    embed_parts: list = field(default_factory=list)   # their embeddings, until all are done
    generator: Optional[torch.Generator] = None
    num_cached: int = 0                               # tokens whose K/V are in the cache
    t_arrival: float = field(default_factory=time.perf_counter)
    t_first_token: Optional[float] = None
    t_finish: Optional[float] = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)
