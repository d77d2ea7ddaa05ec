"""The runtime spec (runtime/spec.py RuntimeSpec: model, buckets, chat, image, generation
defaults), filled here from a checkpoint's config and tokenizer; the artifact writer stores its
dict in manifest.json and the eager engine of the tests uses it directly."""
from __future__ import annotations

from ..graphs.config import ModelConfig
from ..graphs.parallel import TPInfo
from ..runtime import templates
from ..runtime.spec import DTYPES, BucketSpec, ChatSpec, GenerationSpec, ImageSpec, RuntimeSpec
from ..runtime.tokenizer import Tokenizer
from .buckets import Buckets

DTYPE_NAMES = tuple(DTYPES)


def build_spec(cfg: ModelConfig, buckets: Buckets, dtype: str, tokenizer: Tokenizer, tp: TPInfo = TPInfo()) -> dict:
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"DTYPE must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    template = templates.get_template(cfg.template)
    stop_ids = []
    for s in template.stop_strings:
        tid = tokenizer.token_to_id(s)
        if tid is None:
            raise ValueError(f"the tokenizer has no token for the template's stop string {s!r}")
        stop_ids.append(tid)
    # The original chat() stops only at the template's separator token (it overrides the model's
    # eos_token_id with it), so that is the default stop. The tokenizer's own EOS is recorded apart:
    # a request opts in to stopping there too (SamplingParams.stop_at_eos, internvl-run --stop-at-eos).
    eos_ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    img_ctx = tokenizer.token_to_id(templates.IMG_CONTEXT_TOKEN)
    if img_ctx is None:
        raise ValueError(f"the tokenizer has no {templates.IMG_CONTEXT_TOKEN} token")
    if cfg.image_context_token_id not in (-1, img_ctx):
        raise ValueError(f"config image_context_token_id {cfg.image_context_token_id} != tokenizer's {img_ctx}")
    cfg.image_context_token_id = img_ctx
    b = buckets.to_dict()
    spec = RuntimeSpec(
        model_name=cfg.name, config=cfg.to_dict(), dtype=dtype,
        buckets=BucketSpec(*(tuple(b[k]) for k in ("vision", "prefill", "batch", "context")), b["block_size"]),
        tp=tp.world_size, rank_kv_heads=tp.kv_heads(cfg.llm.num_kv_heads),
        # The process group name the graphs' collectives were compiled against; the runtime's
        # default group must have it (checked at start-up).
        tp_group=tp.group_name if tp.world_size > 1 else None,
        chat=ChatSpec(cfg.template, template.system_message),
        image=ImageSpec(cfg.vision.image_size, cfg.num_image_token, cfg.dynamic_image_size, cfg.use_thumbnail,
                        cfg.min_dynamic_patch, cfg.max_dynamic_patch),
        # Artifacts written before eos_token_ids existed have the EOS inside stop_token_ids and no
        # eos_token_ids: they keep stopping at EOS, as they did.
        generation=GenerationSpec(tuple(stop_ids), tuple(eos_ids), tuple(template.stop_strings)))
    return spec.to_dict()
