"""Our eager graphs (graphs/) against transformers' InternVLForConditionalGeneration, fp32.

Weights come from the tiny checkpoints through compile/checkpoint.py, in -hf and original
formats (InternLM2 with packed wqkv, Llama, Qwen2); prompts go through our template,
tokenizer and tiling, and transformers gets the same ids and pixels.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from internvl_aot.compile.buckets import Buckets
from internvl_aot.compile.checkpoint import load_checkpoint
from internvl_aot.compile.eager import eager_engine
from internvl_aot.graphs.model import PrefillStage, VisionStage, build_model
from internvl_aot.runtime.engine import Request
from internvl_aot.runtime.sampler import SamplingParams

# (spec, format): every spec as -hf, plus every original-format LLM flavour.
CASES = [("llama_vit300m", "hf"), ("llama_vit300m", "internlm2"), ("llama_vit6b", "internlm2"),
         ("llama_vit6b", "llama"), ("qwen2_vit300m", "qwen2"), ("qwen2_vit6b", "hf"), ("llama_vit6b", "hf"),
         ("qwen2_vit300m", "hf")]
# Small buckets so prompts are prefilled in several chunks and batches get padded.
BUCKETS = Buckets(vision=(1, 2), prefill=(32, 128), batch=(1, 2, 4), context=(2048,), block_size=16)


def _dir(ck, fmt):
    return ck.hf_dir if fmt == "hf" else ck.original_dirs[fmt]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _image(seed, w, h):
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8"))


@pytest.mark.parametrize("name,fmt", CASES)
def test_vision_embeddings_and_logits(name, fmt, tiny_checkpoints, tiny_hf_model):
    ck = tiny_checkpoints[name]
    cfg, weights = load_checkpoint(_dir(ck, fmt))
    model = build_model(cfg, weights)
    hf = tiny_hf_model(name)
    torch.manual_seed(0)
    check_vision_and_prefill(model, hf, cfg, torch.randn(3, 3, 448, 448))


def check_vision_and_prefill(model, hf, cfg, pixels):
    """Our vision embeddings and the logits of one prefill over a prompt with 256 image tokens (the
    first image's) against transformers, both within 1e-4; -> our image embeddings."""
    n = pixels.shape[0]
    with torch.no_grad():
        ref = hf.model.get_image_features(pixels, vision_feature_layer=hf.config.vision_feature_layer,
                                          vision_feature_select_strategy="default").pooler_output
        ours = VisionStage(model)(pixels)
        assert ours.shape == ref.shape == (n, 256, cfg.llm.hidden_size)
        assert _rel(ours, ref) < 1e-4
        img_id = cfg.image_context_token_id
        ids = [1, 5, 9] + [img_id] * 256 + [7, 11, 13, 17]
        t = len(ids)
        ref_logits = hf(input_ids=torch.tensor([ids]), pixel_values=pixels[:1]).logits[0, -1]
        bs, nblocks = 16, 64
        attn = model.language_model.layers[0].self_attn
        shape = (cfg.llm.num_layers, nblocks, bs, attn.kv_heads, attn.head_dim)
        k, v = torch.zeros(shape), torch.zeros(shape)
        ids_t = torch.tensor(ids)
        mask = ids_t == img_id
        embeds = torch.zeros(t, cfg.llm.hidden_size)
        embeds[mask] = ours[0]
        table = torch.arange(1, nblocks)[None]
        logits = PrefillStage(model)(ids_t, torch.arange(t), embeds, mask, torch.arange(t) + bs, table,
                                     torch.tensor([t - 1]), k, v)
        assert _rel(logits[0, :ref_logits.shape[0]], ref_logits) < 1e-4
    return ours


def _requests(max_new=32):
    p = SamplingParams(max_new_tokens=max_new, ignore_eos=True)
    return [
        Request(prompt="What is shown in this picture?", images=[_image(1, 700, 400)], max_tiles=2, params=p),
        Request(prompt="Image-1: <image>\nImage-2: <image>\nDescribe the two images.",
                images=[_image(2, 300, 300), _image(3, 200, 900)], max_tiles=2, params=p),
        Request(prompt="Hello, world! Please answer the question briefly.", params=p),
    ]


def hf_greedy(hf, prompt_ids, tiles, max_new):
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    kw = {"pixel_values": tiles} if tiles is not None else {}
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                          min_new_tokens=0, do_sample=False, **kw)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("name,fmt", [("llama_vit300m", "internlm2"), ("llama_vit6b", "hf"),
                                      ("qwen2_vit300m", "qwen2"), ("qwen2_vit6b", "hf")])
def test_greedy_generation_matches_transformers(name, fmt, tiny_checkpoints, tiny_hf_model):
    """32 greedy tokens, single image, two images and text only, all in one batch."""
    ck = tiny_checkpoints[name]
    path = _dir(ck, fmt)
    cfg, weights = load_checkpoint(path)
    engine = eager_engine(cfg, weights, path, BUCKETS, dtype="fp32")
    reqs = _requests()
    seqs = [engine.make_sequence(r) for r in reqs]
    tiles = [s.pixel_values for s in seqs]
    results = engine.generate(reqs)
    hf = tiny_hf_model(name)
    for req, res, t in zip(reqs, results, tiles):
        assert len(res.output_token_ids) == 32
        expected = hf_greedy(hf, res.prompt_token_ids, t, 32)
        assert res.output_token_ids == expected, f"prompt {req.prompt!r}"
    # The tokens are not degenerate (a constant stream would hide attention bugs).
    assert max(len(set(r.output_token_ids)) for r in results) > 3
