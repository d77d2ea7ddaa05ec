"""The CLIP judge of the reference README (`clip_score_internvl.py`): a prediction's score is the
cosine similarity of CLIP's image features of the picture and text features of the text.

`--clip` is a transformers CLIP directory (config.json + weights) or open_clip's
`open_clip_pytorch_model.bin` (ViT-H-14 in the reference; the file or its folder). The open_clip
weights are mapped here onto transformers' `CLIPModel`, so neither open_clip nor torchvision nor
timm is needed (they pull a CUDA build of torch):
- `transformer.resblocks.{i}` / `visual.transformer.resblocks.{i}` -> `{text,vision}_model.encoder.layers.{i}`:
  `ln_1`/`ln_2` -> `layer_norm1/2`, `attn.in_proj_{weight,bias}` split in three -> `self_attn.{q,k,v}_proj`,
  `attn.out_proj` -> `self_attn.out_proj`, `mlp.c_fc`/`mlp.c_proj` -> `mlp.fc1/fc2`;
- `token_embedding`, `positional_embedding`, `ln_final` -> the text embeddings and final norm;
  `visual.class_embedding`, `visual.positional_embedding`, `visual.conv1` (no bias), `visual.ln_pre`,
  `visual.ln_post` -> the vision embeddings, `pre_layrnorm` (sic) and `post_layernorm`;
- `text_projection` and `visual.proj` are used as `x @ P` by open_clip: transposed into the
  projections' weights; `logit_scale` as is.
The shapes give every size but the head counts: those come from an `open_clip_config.json` next to
the weights (the laion repositories ship one), else 64-wide heads (80 for a 1280-wide vision tower:
ViT-H-14's). Every parameter of the CLIPModel is written by name and checked.

Preprocessing is open_clip's (and CLIP's): RGB, resize the short side to the model's size (bicubic,
the long side truncated), centre crop (offsets rounded), scale to [0, 1], normalise with the
CLIP mean and std (or those of a `preprocessor_config.json` in a transformers directory).
The tokenizer is the CLIP BPE of the directory (`--clip-tokenizer` otherwise), truncated to the
model's context, pooled at the end-of-text token, as open_clip pools at the largest id.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
OPEN_CLIP_FILE = "open_clip_pytorch_model.bin"
_VISION_HEAD_WIDTH = {1280: 80, 1408: 88, 1664: 104}      # ViT-H-14, ViT-g-14, ViT-bigG-14
_IGNORED = re.compile(r"(^|\.)attn_mask$")


class ClipError(ValueError):
    pass


# ---------------------------------------------------------------- open_clip -> transformers

def _block_map(src: dict, prefix: str, dst: str, out: dict) -> int:
    layers = sorted({int(m[1]) for k in src if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})
    pairs = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for i in layers:
        p, d = f"{prefix}{i}.", f"{dst}{i}."
        for a, b in pairs.items():
            for n in ("weight", "bias"):
                out[f"{d}{b}.{n}"] = src[f"{p}{a}.{n}"]
        for n in ("weight", "bias"):
            for name, part in zip("qkv", torch.chunk(src[f"{p}attn.in_proj_{n}"], 3, dim=0)):
                out[f"{d}self_attn.{name}_proj.{n}"] = part
    return len(layers)


def open_clip_to_hf(sd: dict) -> tuple[dict, dict]:
    """open_clip state dict -> (transformers CLIPModel state dict, sizes read off the shapes)."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    try:
        n_text = _block_map(sd, "transformer.resblocks.", "text_model.encoder.layers.", out)
        n_vis = _block_map(sd, "visual.transformer.resblocks.", "vision_model.encoder.layers.", out)
        out["text_model.embeddings.token_embedding.weight"] = sd["token_embedding.weight"]
        out["text_model.embeddings.position_embedding.weight"] = sd["positional_embedding"]
        out["vision_model.embeddings.class_embedding"] = sd["visual.class_embedding"]
        out["vision_model.embeddings.position_embedding.weight"] = sd["visual.positional_embedding"]
        out["vision_model.embeddings.patch_embedding.weight"] = sd["visual.conv1.weight"]
        for a, b in (("ln_final", "text_model.final_layer_norm"), ("visual.ln_pre", "vision_model.pre_layrnorm"),
                     ("visual.ln_post", "vision_model.post_layernorm")):
            for n in ("weight", "bias"):
                out[f"{b}.{n}"] = sd[f"{a}.{n}"]
        out["text_projection.weight"] = sd["text_projection"].t().contiguous()
        out["visual_projection.weight"] = sd["visual.proj"].t().contiguous()
        out["logit_scale"] = sd["logit_scale"].reshape(())
    except KeyError as e:
        raise ClipError(f"not an open_clip CLIP state dict (ViT towers): no {e.args[0]!r}") from None
    used = {k for k in sd if not _IGNORED.search(k)}
    mapped_from = {k for k in used if k.startswith(("transformer.resblocks.", "visual.transformer.resblocks."))}
    mapped_from |= {"token_embedding.weight", "positional_embedding", "visual.class_embedding",
                    "visual.positional_embedding", "visual.conv1.weight", "text_projection", "visual.proj",
                    "logit_scale"} | {f"{a}.{n}" for a in ("ln_final", "visual.ln_pre", "visual.ln_post")
                                      for n in ("weight", "bias")}
    extra = sorted(used - mapped_from)
    if extra:
        raise ClipError(f"open_clip keys this mapping does not know: {extra[:6]}")
    conv = sd["visual.conv1.weight"]
    grid = sd["visual.positional_embedding"].shape[0] - 1
    sizes = {"text_width": sd["token_embedding.weight"].shape[1], "vocab": sd["token_embedding.weight"].shape[0],
             "context": sd["positional_embedding"].shape[0], "text_layers": n_text,
             "text_mlp": sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
             "vision_width": conv.shape[0], "patch": conv.shape[-1], "image_size": conv.shape[-1] * math.isqrt(grid),
             "vision_layers": n_vis, "vision_mlp": sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
             "embed_dim": sd["text_projection"].shape[1]}
    return out, sizes


def hf_config_for(sizes: dict, oc_cfg: dict | None, eos_token_id: int, bos_token_id: int):
    from transformers import CLIPConfig
    m = (oc_cfg or {}).get("model_cfg", oc_cfg or {})
    vcfg, tcfg = m.get("vision_cfg", {}), m.get("text_cfg", {})
    head_width = vcfg.get("head_width", _VISION_HEAD_WIDTH.get(sizes["vision_width"], 64))
    text_heads = tcfg.get("heads", max(1, sizes["text_width"] // 64))
    act = "quick_gelu" if m.get("quick_gelu") else "gelu"
    text = dict(vocab_size=sizes["vocab"], hidden_size=sizes["text_width"], intermediate_size=sizes["text_mlp"],
                num_hidden_layers=sizes["text_layers"], num_attention_heads=text_heads,
                max_position_embeddings=sizes["context"], hidden_act=act, layer_norm_eps=1e-5,
                projection_dim=sizes["embed_dim"], eos_token_id=eos_token_id, bos_token_id=bos_token_id,
                pad_token_id=0)
    vision = dict(hidden_size=sizes["vision_width"], intermediate_size=sizes["vision_mlp"],
                  num_hidden_layers=sizes["vision_layers"], num_attention_heads=sizes["vision_width"] // head_width,
                  image_size=sizes["image_size"], patch_size=sizes["patch"], hidden_act=act, layer_norm_eps=1e-5,
                  projection_dim=sizes["embed_dim"])
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=sizes["embed_dim"])


def _load_into(model, state: dict) -> None:
    params = dict(model.named_parameters())
    if "vision_model.pre_layernorm.weight" in params:         # the name's spelling in other transformers versions
        state = {k.replace("pre_layrnorm", "pre_layernorm"): v for k, v in state.items()}
    if set(params) != set(state):
        raise ClipError(f"CLIPModel parameters differ from the mapped weights: {sorted(set(params) ^ set(state))[:6]}")
    with torch.no_grad():
        for name, p in params.items():
            if tuple(p.shape) != tuple(state[name].shape):
                raise ClipError(f"{name}: CLIPModel {tuple(p.shape)}, weights {tuple(state[name].shape)}")
            p.copy_(state[name])


# ---------------------------------------------------------------- the judge

class ClipJudge:
    def __init__(self, model, tokenizer, image_size: int, mean, std, source: str, device: str = "cpu"):
        self.model, self.tokenizer = model.eval().to(device), tokenizer
        self.image_size, self.mean, self.std = image_size, np.array(mean, np.float32), np.array(std, np.float32)
        self.source, self.device = source, torch.device(device)
        self.context = model.config.text_config.max_position_embeddings

    @classmethod
    def load(cls, path: Path, tokenizer: str | None = None, device: str = "cpu") -> "ClipJudge":
        from transformers import AutoTokenizer, CLIPModel
        path = Path(path)
        bin_file = path if path.is_file() else path / OPEN_CLIP_FILE
        folder = path.parent if path.is_file() else path
        tok = AutoTokenizer.from_pretrained(str(tokenizer or folder))
        mean, std = CLIP_MEAN, CLIP_STD
        if path.is_dir() and (path / "config.json").is_file():
            model = CLIPModel.from_pretrained(str(path), dtype=torch.float32)
            pp = folder / "preprocessor_config.json"
            if pp.is_file():
                c = json.loads(pp.read_text())
                mean, std = c.get("image_mean", mean), c.get("image_std", std)
            return cls(model, tok, model.config.vision_config.image_size, mean, std, f"transformers CLIP {path}", device)
        if not bin_file.is_file():
            raise ClipError(f"{path}: neither a transformers CLIP directory (config.json) nor {OPEN_CLIP_FILE}")
        sd = torch.load(str(bin_file), map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "state_dict" in sd:
            sd = sd["state_dict"]
        state, sizes = open_clip_to_hf(sd)
        oc = folder / "open_clip_config.json"
        oc_cfg = json.loads(oc.read_text()) if oc.is_file() else None
        cfg = hf_config_for(sizes, oc_cfg, tok.eos_token_id, tok.bos_token_id)
        from transformers.initialization import no_init_weights
        with no_init_weights():
            model = CLIPModel._from_config(cfg, dtype=torch.float32)
        _load_into(model, state)
        pre = (oc_cfg or {}).get("preprocess_cfg", {})
        return cls(model, tok, sizes["image_size"], pre.get("mean", mean), pre.get("std", std),
                   f"open_clip {bin_file} (mapped onto transformers CLIPModel)", device)

    def describe(self) -> str:
        v, t = self.model.config.vision_config, self.model.config.text_config
        return (f"{self.source}: vision {v.num_hidden_layers}x{v.hidden_size} ({v.num_attention_heads} heads, "
                f"{v.image_size} px, patch {v.patch_size}), text {t.num_hidden_layers}x{t.hidden_size}")

    def pixels(self, image) -> torch.Tensor:
        img = image if isinstance(image, Image.Image) else Image.open(image)
        img = img.convert("RGB")
        s = self.image_size
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(s * long / short)
        img = img.resize((s, new_long) if w <= h else (new_long, s), Image.BICUBIC)
        w, h = img.size
        top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
        img = img.crop((left, top, left + s, top + s))
        x = (np.asarray(img, np.float32) / 255.0 - self.mean) / self.std
        return torch.from_numpy(x.transpose(2, 0, 1).copy()).unsqueeze(0)

    @torch.inference_mode()
    def image_features(self, image) -> torch.Tensor:
        out = self.model.get_image_features(pixel_values=self.pixels(image).to(self.device))
        return getattr(out, "pooler_output", out).float()[0]

    @torch.inference_mode()
    def text_features(self, text: str) -> torch.Tensor:
        enc = self.tokenizer([text], truncation=True, max_length=self.context, return_tensors="pt")
        out = self.model.get_text_features(input_ids=enc["input_ids"].to(self.device))
        return getattr(out, "pooler_output", out).float()[0]

    def score(self, image_feat: torch.Tensor, text: str) -> float:
        return torch.nn.functional.cosine_similarity(image_feat, self.text_features(text), dim=0).item()


def read_predictions(path: Path) -> dict[str, str]:
    """{image file name: text}: a JSON object (the reference README's format), a JSON list or a jsonl
    of records with an image and a text field (`text`, `output`, `prediction`, `caption`, `answer`),
    or a compare.json (its artifact outputs)."""
    path = Path(path)
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(data, dict) and "inputs" in data and "summary" in data:
        data = [{"image": r["image"], "text": r["text"]} for r in data["inputs"] if r.get("image")]
    if isinstance(data, dict):
        return {str(k): str(v) for k, v in data.items()}
    out = {}
    for r in data:
        img = r.get("image") or r.get("image_file") or r.get("file")
        txt = next((r[k] for k in ("text", "output", "prediction", "caption", "answer") if k in r), None)
        if img is None or txt is None:
            raise ClipError(f"{path}: a record without an image or text field: {r}")
        out.setdefault(Path(img).name, str(txt))
    return out
