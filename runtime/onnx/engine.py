"""The Engine on numpy arrays, for BACKEND=onnx artifacts on a box without torch.

`NumpyEngine` is runtime/engine.py's Engine (requests, templates, tiling, tokenizer, the scheduler and
its continuous batching, stop rules, results: all inherited, not copied) with the torch pieces swapped
for their numpy twins (runtime/onnx/numpy_runner.py: pool, runner, sampler) through the engine's four
array hooks. `Engine.from_artifact` returns one when torch is not installed, so `internvl-run`,
`internvl-serve` and the Python API run an ONNX artifact unchanged.
"""
from __future__ import annotations

import contextlib

import numpy as np

from ..engine import Engine
from ..kv_cache import GiB, BlockAllocator
from ..scheduler import Scheduler
from ..spec import RuntimeSpec
from .numpy_runner import NP_DTYPES, NumpyKVPool, NumpyRunner, NumpySampler, make_rng


class NumpyEngine(Engine):
    def __init__(self, spec, graphs: dict, tokenizer, kv_cache_gb: float | None = None,
                 kv_cache_fraction: float = 0.5, prefill_chunks_per_decode: int | None = None):
        self.manifest = spec.to_dict() if isinstance(spec, RuntimeSpec) else spec
        self.spec = spec = spec if isinstance(spec, RuntimeSpec) else RuntimeSpec.from_dict(spec)
        if spec.dtype not in NP_DTYPES:
            raise ValueError(f"the numpy engine runs fp32/fp16 artifacts, this one is {spec.dtype}")
        self.tokenizer, self.device, self.tp_group = tokenizer, "cpu", None
        self.resources: list = []
        self.dtype = NP_DTYPES[spec.dtype]
        b = spec.buckets
        self.pool = NumpyKVPool.from_budget(
            spec.llm.num_layers, spec.rank_kv_heads, spec.llm.head_dim, b.block_size, self.dtype,
            budget_bytes=None if kv_cache_gb is None else int(kv_cache_gb * GiB),
            max_blocks=b.blocks_per_seq * b.max_batch + 1, fraction_of_free=kv_cache_fraction)
        self.allocator = BlockAllocator(self.pool.num_blocks, b.block_size)
        self.runner = NumpyRunner(graphs, b, self.pool, self.allocator, spec.llm.hidden_size,
                                  spec.image_context_token_id, self.dtype)
        self.stop_ids = set(spec.generation.stop_token_ids)
        self.eos_ids = set(spec.generation.eos_token_ids) - self.stop_ids
        self.sampler = NumpySampler(vocab_limit=spec.llm.vocab_size)
        self.scheduler = Scheduler(self.allocator, self.runner.policy, self._stop_reason,
                                   prefill_chunks_per_decode=prefill_chunks_per_decode)

    @classmethod
    def open(cls, path, kv_cache_gb: float | None = None, skip_verify: bool = False, threads: int | None = None,
             prefill_chunks_per_decode: int | None = None, trusted_keys=None) -> "NumpyEngine":
        from .artifact import open_onnx_artifact
        manifest, graphs, tokenizer = open_onnx_artifact(path, skip_verify=skip_verify, threads=threads,
                                                         trusted_keys=trusted_keys)
        return cls(manifest, graphs, tokenizer, kv_cache_gb=kv_cache_gb,
                   prefill_chunks_per_decode=prefill_chunks_per_decode)

    @classmethod
    def from_artifact(cls, path, device=None, kv_cache_gb=None, skip_verify=False, threads=None,
                      prefill_chunks_per_decode=None) -> "NumpyEngine":
        return cls.open(path, kv_cache_gb=kv_cache_gb, skip_verify=skip_verify, threads=threads,
                        prefill_chunks_per_decode=prefill_chunks_per_decode)

    def _tile_array(self, tiles):
        return tiles

    def _concat(self, arrays):
        return np.concatenate(arrays)

    def _generator(self, params):
        return make_rng(params)

    def _inference(self):
        return contextlib.nullcontext()
