"""Opening what the commands run, and the two probes `compare` needs from an engine.

`open_engine(path)`: an artifact directory (manifest.json) through `Engine.from_artifact`, or a
checkpoint directory (config.json) through the uncompiled graphs (compile/eager.py: the
runtime's engine, padding, chunking and paged cache unchanged, the graphs not compiled).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..runtime.engine import Engine, Request

EAGER_BUCKETS = "vision=1;prefill=512;batch=1,8;context=2048;block_size=32"


def is_artifact(path) -> bool:
    return (Path(path) / "manifest.json").is_file()


def is_checkpoint(path) -> bool:
    return (Path(path) / "config.json").is_file() and not is_artifact(path)


def open_engine(path, dtype: str = "fp32", buckets: str = EAGER_BUCKETS) -> Engine:
    path = Path(path)
    if is_artifact(path):
        return Engine.from_artifact(path)
    if is_checkpoint(path):
        from ..compile.buckets import Buckets
        from ..compile.checkpoint import load_checkpoint
        from ..compile.eager import eager_engine
        cfg, weights = load_checkpoint(path)
        return eager_engine(cfg, weights, path, Buckets.parse(buckets), dtype=dtype)
    raise SystemExit(f"{path}: neither an artifact (manifest.json) nor a checkpoint (config.json)")


def describe(engine: Engine, path) -> dict:
    s = engine.spec
    return {"path": str(path), "kind": "artifact" if is_artifact(path) else "eager graphs of a checkpoint",
            "dtype": s.dtype, "tp": s.tp, "device": str(engine.device)}


def vocab_size(engine: Engine) -> int:
    return engine.spec.llm.vocab_size


def probe(engine: Engine, req: Request) -> tuple[list[int], torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(prompt ids, pixel tiles, first-token logits [V] fp32, vision embeddings [tokens, hidden] fp32
    or None) of one request: its images through the vision graphs and its prompt through the
    prefill graphs, into blocks of the engine's pool that are freed afterwards. Call it only
    while the engine has nothing else in flight."""
    seq = engine.make_sequence(req)
    engine.allocator.allocate(seq.seq_id, len(seq))
    try:
        with torch.inference_mode():
            embeds = None
            if seq.pixel_values is not None:
                embeds = engine.runner.encode_images(seq.pixel_values)
                seq.image_embeds = embeds
            logits = engine.runner.prefill(seq)
    finally:
        engine.allocator.free(seq.seq_id)
    logits = logits.reshape(-1)[:vocab_size(engine)].float().cpu()
    return seq.prompt_ids, seq.pixel_values, logits, None if embeds is None else embeds.float().cpu()
