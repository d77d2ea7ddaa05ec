"""The reference side of `compare` when it is a checkpoint: transformers'
`InternVLForConditionalGeneration` on the original weights.

The checkpoint is read by compile/checkpoint.py (either format; canonical names, InternLM2's packed
wqkv unpacked) and handed to transformers by bench/hf_weights.py, which writes every parameter by
name and checks it (transformers 5 can leave tied or unexpected parameters at their initial
values otherwise). It is fed the artifact's own prompt ids and pixel tiles, so that the comparison
is of the models, not of two tokenizers or tilings (those have their own tests).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..runtime.manifest import DTYPES


class TransformersReference:
    def __init__(self, checkpoint: Path, dtype: str = "fp32", device: str = "cpu",
                 attn_implementation: str = "eager"):
        from ..bench.hf_weights import build_hf_model
        from ..compile.checkpoint import load_checkpoint

        cfg, canonical = load_checkpoint(checkpoint)
        self.config = cfg
        self.dtype, self.device = DTYPES[dtype], torch.device(device)
        manifest = {"model": {"config": cfg.to_dict()}, "tp": 1}
        self.model = build_hf_model(Path(checkpoint), manifest, self.dtype, attn_implementation, device,
                                    canonical=canonical)
        gc = self.model.generation_config
        gc.temperature = gc.top_p = gc.top_k = None
        self.info = {"path": str(checkpoint), "kind": "transformers InternVLForConditionalGeneration",
                     "dtype": dtype, "tp": 1, "device": str(self.device)}

    def _pixels(self, pixel_values):
        return None if pixel_values is None else pixel_values.to(self.device, self.dtype)

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], pixel_values, max_new_tokens: int, stop_ids) -> tuple[list[int], torch.Tensor]:
        """Greedy tokens (ending with the stop token when one came) and the first token's logits [V] fp32."""
        ids = torch.tensor([prompt_ids], device=self.device)
        kw = {} if pixel_values is None else {"pixel_values": self._pixels(pixel_values)}
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, num_beams=1, eos_token_id=list(stop_ids) or None,
                                  pad_token_id=0, output_logits=True, return_dict_in_generate=True, **kw)
        tokens = out.sequences[0, ids.shape[1]:].tolist()
        return tokens, out.logits[0][0].float().cpu()

    @torch.inference_mode()
    def vision_embeds(self, pixel_values) -> torch.Tensor:
        c = self.model.config
        feats = self.model.get_image_features(pixel_values=self._pixels(pixel_values),
                                              vision_feature_layer=c.vision_feature_layer,
                                              vision_feature_select_strategy=c.vision_feature_select_strategy)
        feats = getattr(feats, "pooler_output", feats)
        return feats.reshape(-1, feats.shape[-1]).float().cpu()
