"""The offline engine: requests in, text out, through an artifact's graphs.

`Engine.from_artifact(dir)` is what `internvl-run`, the server and the benchmark use. The
engine needs only the artifact's manifest fields (model config, buckets, dtype, chat and
image settings, stop tokens), a tokenizer and a dict of graph callables, so tests can also
drive it with the eager modules (compile/eager.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

try:
    import torch
except ImportError:         # a box with only the ONNX runtime: Engine.from_artifact hands over to runtime/onnx/engine.py
    torch = None

from . import image_tiling, templates
from .buckets import check_signatures
from .kv_cache import GiB, BlockAllocator, KVPool
from .spec import RuntimeSpec
from .model_runner import ModelRunner
from .sampler import Sampler, SamplingParams, make_generator
from .scheduler import Scheduler, StepRecord
from .sequence import Sequence, Status
from .tokenizer import Tokenizer



class RequestError(ValueError):
    """A request that cannot run (too long, bad image, bad parameters), refused before any work."""


@dataclass
class Request:
    prompt: str = ""
    images: list = field(default_factory=list)      # paths, bytes or PIL images, in placeholder order
    system: Optional[str] = None                   # None: the template's default system message
    history: list = field(default_factory=list)    # [(user, assistant), ...]
    max_tiles: Optional[int] = None                 # None: the checkpoint's max_dynamic_patch
    params: SamplingParams = field(default_factory=SamplingParams)
    raw_prompt: bool = False                        # prompt is already templated text


@dataclass
class Result:
    text: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    num_tiles: list[int]
    finish_reason: str
    timings: dict


class Engine:
    def __init__(self, spec: "RuntimeSpec | dict", graphs: dict, tokenizer: Tokenizer, device: str | torch.device = "cpu",
                 kv_cache_gb: float | None = None, kv_cache_fraction: float = 0.5, tp_group=None,
                 prefill_chunks_per_decode: int | None = None):
        """tp_group: for a tensor-parallel artifact, rank 0's handle on the other ranks (runtime/tp.py);
        `graphs` are then rank 0's graphs wrapped by it, and every rank gets a pool like this one's.
        prefill_chunks_per_decode: None runs all waiting prefill work before the next decode step
        (offline); k interleaves at most k vision/prefill chunks between decode steps (serving)."""
        self.manifest = spec.to_dict() if isinstance(spec, RuntimeSpec) else spec    # as stored in manifest.json
        self.spec = spec = spec if isinstance(spec, RuntimeSpec) else RuntimeSpec.from_dict(spec)
        self.tokenizer, self.device = tokenizer, torch.device(device)
        self.tp_group = tp_group
        self.resources: list = []        # closed with the engine, after the TP group (e.g. an NPU session)
        check_signatures(graphs, spec)
        self.dtype = spec.torch_dtype
        b = spec.buckets
        # Without an explicit budget: enough for the largest batch at the largest context, capped
        # by a fraction of free memory.
        budget = None if kv_cache_gb is None else int(kv_cache_gb * GiB)
        if tp_group is not None and self.device.type == "cpu":
            kv_cache_fraction /= spec.tp             # every rank's pool comes out of the same memory
        self.pool = KVPool.from_budget(
            spec.llm.num_layers, spec.rank_kv_heads, spec.llm.head_dim, b.block_size, self.dtype, self.device,
            budget_bytes=budget, fraction_of_free=None if budget else kv_cache_fraction,
            max_blocks=None if budget else b.blocks_per_seq * b.max_batch + 1, blocks_per_seq=b.blocks_per_seq)
        self.allocator = BlockAllocator(self.pool.k_cache.shape[1], b.block_size)
        if tp_group is not None:
            tp_group.allocate_pools(self.pool.k_cache.shape[1])    # one block table for every rank
        self.runner = ModelRunner(graphs, b, self.pool, self.allocator, spec.llm.hidden_size,
                                  spec.image_context_token_id, self.dtype, self.device)
        # The template's separator ends a generation, as in the original chat(); the tokenizer's EOS
        # only for a request that opts in (SamplingParams.stop_at_eos). Older artifacts have the EOS
        # inside stop_token_ids and no eos_token_ids: they keep stopping at it.
        self.stop_ids = set(spec.generation.stop_token_ids)
        self.eos_ids = set(spec.generation.eos_token_ids) - self.stop_ids
        self.sampler = Sampler(vocab_limit=spec.llm.vocab_size)
        self.scheduler = Scheduler(self.allocator, self.runner.policy, self._stop_reason,
                                   prefill_chunks_per_decode=prefill_chunks_per_decode)

    # -- loading ------------------------------------------------------------------------------------
    @classmethod
    def from_artifact(cls, path: str | Path, device: str | None = None, kv_cache_gb: float | None = None,
                      skip_verify: bool = False, threads: int | None = None,
                      prefill_chunks_per_decode: int | None = None) -> "Engine":
        """Open an artifact. A tensor-parallel one starts its other ranks as child processes
        (one per rank; runtime/tp.py) that live until `close()` (or the end of this process);
        `kv_cache_gb` is then per rank, and `threads` the CPU threads of each rank (default:
        the cores shared out between the ranks)."""
        if (Path(path) / "npu_manifest.json").is_file():       # BACKEND=npu: .om graphs through ACL
            from .backends.npu import open_npu_engine
            engine = open_npu_engine(path)
            engine.scheduler.prefill_chunks_per_decode = prefill_chunks_per_decode
            return engine
        from .onnx.artifact import is_onnx_artifact
        if is_onnx_artifact(path):                             # BACKEND=onnx: onnxruntime sessions
            if torch is None:                                  # without torch: the numpy engine
                from .onnx.engine import NumpyEngine
                return NumpyEngine.open(path, kv_cache_gb=kv_cache_gb, skip_verify=skip_verify, threads=threads,
                                        prefill_chunks_per_decode=prefill_chunks_per_decode)
            from .onnx.artifact import open_onnx_artifact
            spec, graphs, tokenizer = open_onnx_artifact(path, skip_verify=skip_verify,
                                                         threads=threads or torch.get_num_threads())
            return cls(spec, graphs, tokenizer, "cpu", kv_cache_gb=kv_cache_gb,
                       prefill_chunks_per_decode=prefill_chunks_per_decode)
        from .artifact import load_artifact, open_tp_artifact
        from .manifest import read_manifest
        if int(read_manifest(Path(path)).get("tp", 1)) > 1:
            spec, graphs, tokenizer, dev, group = open_tp_artifact(Path(path), device, skip_verify, threads)
            try:
                return cls(spec, graphs, tokenizer, dev, kv_cache_gb=kv_cache_gb, tp_group=group,
                           prefill_chunks_per_decode=prefill_chunks_per_decode)
            except BaseException:
                group.stop()
                raise
        spec, graphs, tokenizer, dev = load_artifact(Path(path), device=device, skip_verify=skip_verify)
        return cls(spec, graphs, tokenizer, dev, kv_cache_gb=kv_cache_gb,
                   prefill_chunks_per_decode=prefill_chunks_per_decode)

    def close(self) -> None:
        """Stop the other tensor-parallel ranks, if any, and close `resources` (a no-op otherwise)."""
        if self.tp_group is not None:
            self.tp_group.stop()
        while self.resources:
            self.resources.pop().close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests -----------------------------------------------------------------------------------
    def is_stop_token(self, seq: Sequence, token: int) -> bool:
        """A token that ends seq and is not part of its text."""
        if seq.params.ignore_eos:
            return False
        return token in self.stop_ids or (seq.params.stop_at_eos and token in self.eos_ids)

    def _stop_reason(self, seq: Sequence, token: int) -> Optional[str]:
        if self.is_stop_token(seq, token):
            return "stop"
        if token in seq.params.stop_token_ids:
            return "stop"
        if len(seq.output_ids) >= seq.params.max_new_tokens or len(seq) >= self.runner.max_context:
            return "length"
        return None

    def make_sequence(self, req: Request, on_token: Callable | None = None) -> Sequence:
        """Tile images, build and tokenize the prompt, check it fits: everything before the graphs run."""
        img = self.spec.image
        max_tiles = req.max_tiles or img.max_dynamic_patch
        if max_tiles < 1:
            raise RequestError(f"max_tiles must be >= 1, got {max_tiles}")
        tiles, counts = [], []
        for image in req.images:
            try:
                if not isinstance(image, image_tiling.Image.Image):
                    image = image_tiling.load_image(image)
                t = image_tiling.image_to_tiles(image, dynamic_image_size=img.dynamic_image_size,
                                                use_thumbnail=img.use_thumbnail, min_num=img.min_dynamic_patch,
                                                max_num=max_tiles, image_size=img.image_size)
            except (ValueError, OSError) as e:
                raise RequestError(str(e)) from None
            tiles.append(self._tile_array(t))
            counts.append(t.shape[0])
        if req.raw_prompt:
            text = req.prompt
        else:
            try:
                text = templates.build_prompt(self.spec.chat.template, req.prompt, counts,
                                              self.spec.image.num_image_token,
                                              system=req.system if req.system is not None else self.spec.chat.system,
                                              history=[tuple(h) for h in req.history])
            except ValueError as e:
                raise RequestError(str(e)) from None
        ids = self.tokenizer.encode(text, add_bos=True)
        if len(ids) >= self.runner.max_context:
            raise RequestError(f"prompt is {len(ids)} tokens; this artifact's largest context bucket is "
                               f"{self.runner.max_context} (use fewer tiles with --max-tiles, or compile with a "
                               f"larger context bucket)")
        n_img = sum(1 for i in ids if i == self.spec.image_context_token_id)
        need = sum(counts) * self.spec.image.num_image_token
        if n_img != need:
            raise RequestError(f"prompt holds {n_img} image-context tokens, the images need "
                               f"{need}: do not type {templates.IMG_CONTEXT_TOKEN} yourself")
        params = req.params
        return Sequence(prompt_ids=ids, params=params, pixel_values=self._concat(tiles) if tiles else None,
                        num_tiles=counts, on_token=on_token, generator=self._generator(params))

    # The engine's few array operations outside the runner and sampler; runtime/onnx/engine.py's numpy
    # engine overrides them.
    def _tile_array(self, tiles):
        return torch.from_numpy(tiles)

    def _concat(self, arrays):
        return torch.cat(arrays)

    def _generator(self, params: SamplingParams):
        return make_generator(params, self.device)

    def _inference(self):
        return torch.inference_mode()

    def add(self, req: Request, on_token: Callable | None = None) -> Sequence:
        seq = self.make_sequence(req, on_token)
        self.scheduler.add(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        self.scheduler.cancel(seq)

    def step(self) -> Optional[StepRecord]:
        """Plan one step, run it, hand the results back to the scheduler; None when idle."""
        work = self.scheduler.schedule()
        if work is None:
            return None
        t0 = time.perf_counter()
        finished: list[int] = []
        new_tokens = 0
        with self._inference():
            if work.kind == "vision":
                seq = work.seqs[0]
                px = seq.pixel_values[work.start:work.start + work.size]
                self.scheduler.vision_done(work, self.runner.vision_chunk(px, work.size))
            elif work.kind == "prefill":
                logits = self.runner.prefill_chunk(work.seqs[0], work.start, work.size)
                if self.scheduler.prefill_done(work):
                    finished = self.scheduler.tokens_sampled(work, self._sample(work.seqs, logits))
                    new_tokens = 1
            else:
                logits = self.runner.decode(work.seqs)
                finished = self.scheduler.tokens_sampled(work, self._sample(work.seqs, logits))
                new_tokens = len(work.seqs)
        return StepRecord(work.kind, [s.seq_id for s in work.seqs], new_tokens, time.perf_counter() - t0,
                          finished=finished)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        return self.sampler(logits, [s.params for s in seqs], [s.all_ids for s in seqs],
                            [s.generator for s in seqs]).tolist()

    def run_until_done(self, seqs: Iterable[Sequence], on_step: Callable[[StepRecord], None] | None = None) -> None:
        seqs = list(seqs)
        while any(s.status is not Status.FINISHED for s in seqs):
            record = self.step()
            if record is None:
                raise RuntimeError("the scheduler has nothing to run but sequences are unfinished")
            if on_step is not None:
                on_step(record)

    def generate(self, requests: list[Request], on_token: Callable | None = None) -> list[Result]:
        """Batched offline generation: every request shares the decode batches."""
        seqs = [self.make_sequence(r, on_token) for r in requests]   # all validated before any work
        for s in seqs:
            self.scheduler.add(s)
        self.run_until_done(seqs)
        return [self.result(s) for s in seqs]

    def result(self, seq: Sequence) -> Result:
        out = [t for t in seq.output_ids if not self.is_stop_token(seq, t)]
        n = len(seq.output_ids)
        decode_s = (seq.t_finish - seq.t_first_token) if seq.t_first_token else 0.0
        return Result(
            text=self.tokenizer.decode(out, skip_special_tokens=True),
            prompt_token_ids=seq.prompt_ids, output_token_ids=seq.output_ids, num_tiles=seq.num_tiles,
            finish_reason=seq.finish_reason or "",
            timings={"ttft_s": round((seq.t_first_token or seq.t_finish) - seq.t_arrival, 6),
                     "decode_tokens_per_s": round((n - 1) / decode_s, 3) if n > 1 and decode_s > 0 else 0.0,
                     "total_s": round(seq.t_finish - seq.t_arrival, 6)})
