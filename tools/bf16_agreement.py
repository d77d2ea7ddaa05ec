#!/usr/bin/env python3
"""bf16 artifact vs transformers fp32 on a tiny checkpoint: greedy token agreement and the cosine
of the first generated token's logits. Prints one line per prompt and a summary.

usage: tools/bf16_agreement.py [WORKDIR]     (compiles a 5-graph tiny bf16 artifact: ~1-2 min)
"""
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_checkpoints import SPECS, build_hf_checkpoint, load_hf_model, write_original  # noqa: E402

from internvl_aot.compile.buckets import Buckets  # noqa: E402
from internvl_aot.compile.checkpoint import load_checkpoint  # noqa: E402
from internvl_aot.compile.pipeline import compile_model  # noqa: E402
from internvl_aot.runtime.engine import Engine, Request  # noqa: E402
from internvl_aot.runtime.sampler import SamplingParams  # noqa: E402

N_NEW = 32


def image(seed, w, h):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def main():
    work = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
    hf_dir, orig = work / "hf", work / "orig"
    if not (orig / "config.json").exists():
        build_hf_checkpoint(SPECS["llama_vit300m"], hf_dir)
        write_original(hf_dir, orig, "internlm2")
    art = work / "art-bf16"
    if not (art / "manifest.json").exists():
        cfg, w = load_checkpoint(orig)
        compile_model(cfg, w, orig, art, Buckets.parse("vision=1;prefill=32,128;batch=1,4;context=2048;block_size=16"),
                      dtype="bf16", log=lambda m: None)
    engine = Engine.from_artifact(art)
    hf = load_hf_model(hf_dir)
    hf.generation_config.eos_token_id = None
    p = SamplingParams(max_new_tokens=N_NEW, ignore_eos=True)
    reqs = [Request(prompt=q, images=imgs, max_tiles=2, params=p) for q, imgs in [
        ("What is shown in this picture?", [image(1, 700, 400)]),
        ("Describe the image.", [image(2, 448, 448)]),
        ("Image-1: <image>\nImage-2: <image>\nCompare them.", [image(3, 300, 300), image(4, 200, 900)]),
        ("Hello, world! Please answer the question briefly.", []),
        ("The quick brown fox jumps over the lazy dog.", [])]]
    results = engine.generate(reqs)
    agree, cos_all = [], []
    for req, res in zip(reqs, results):
        seq = engine.make_sequence(req)
        ids = torch.tensor([res.prompt_token_ids])
        kw = {"pixel_values": seq.pixel_values} if seq.pixel_values is not None else {}
        with torch.no_grad():
            ref_logits = hf(input_ids=ids, **kw).logits[0, -1]
            ref = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW,
                              do_sample=False, **kw)[0, ids.shape[1]:].tolist()
        # first-token logits of the artifact: prefill the same sequence once more
        engine.allocator.allocate(seq.seq_id, len(seq))
        with torch.inference_mode():
            if seq.pixel_values is not None:
                seq.image_embeds = engine.runner.encode_images(seq.pixel_values)
            logits = engine.runner.prefill(seq)[0, :ref_logits.shape[0]].float()
        engine.allocator.free(seq.seq_id)
        cos = torch.nn.functional.cosine_similarity(logits, ref_logits, dim=0).item()
        same = sum(a == b for a, b in zip(res.output_token_ids, ref))
        prefix = next((i for i, (a, b) in enumerate(zip(res.output_token_ids, ref)) if a != b), N_NEW)
        agree.append(same / N_NEW)
        cos_all.append(cos)
        print(f"{req.prompt[:40]!r:44} tokens equal {same}/{N_NEW}, identical prefix {prefix}, "
              f"first-token logit cosine {cos:.6f}")
    print(f"bf16 artifact vs transformers fp32: mean token agreement {np.mean(agree):.3f}, "
          f"min first-token cosine {min(cos_all):.6f}")


if __name__ == "__main__":
    main()
