"""Read an InternVL checkpoint into the canonical config and weight names (docs/CONTRACTS.md).

Two source formats:
- OpenGVLab's original (`InternVLChatModel`): config.json with `vision_config`/`llm_config`,
  keys `vision_model.*`, `mlp1.{0,1,3}.*`, `language_model.model.*` and
  `language_model.output.weight` (InternLM2) or `language_model.lm_head.weight`.
  Phi-3 (InternVL2-4B) keeps its fused `qkv_proj` / `gate_up_proj`; they are split here into the
  canonical q/k/v and gate/up (the fusion passes fuse them again, per rank).
- transformers' native `-hf` format (`InternVLForConditionalGeneration`), in both key
  layouts: `model.vision_tower.* / model.multi_modal_projector.* / model.language_model.* /
  lm_head.weight` (transformers 5) and `vision_tower.* / multi_modal_projector.* /
  language_model.model.* / language_model.lm_head.weight` (4.5x).

Weights are read from safetensors only: pickled `.bin` files are refused, never loaded.
Every name, shape and architecture is checked before any tensor is read, and every
problem is a CheckpointError that names the key or architecture.
"""
from .errors import CheckpointError, PathLike  # noqa: F401
from .config import IMG_CONTEXT_TOKEN, MOE_UNSUPPORTED, SUPPORTED_ROPE_TYPES, find_image_context_token_id, load_config  # noqa: F401
from .loading import load_checkpoint, pack_wqkv, unpack_wqkv  # noqa: F401
from .random_weights import canonical_shapes, checkpoint_fingerprint, num_parameters, random_weights  # noqa: F401
