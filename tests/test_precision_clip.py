"""internvl-eval clipscore: a tiny random CLIP written as a transformers directory and as open_clip's
open_clip_pytorch_model.bin (keys written here by hand, open_clip's layout: fused in_proj, x @ proj
projections, conv1 without bias) gives the same scores through either (the command run in-process); the score is the cosine of
transformers' own projected image and text features of the same pixels and token ids; different
captions score differently."""
import json
import numpy as np
import pytest
import torch
from PIL import Image

from internvl_aot.precision import cli
from internvl_aot.precision import clip as judge_mod


def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_clip_tokenizer(out):
    """A CLIP BPE with single characters only (and a few merges); end-of-text is the largest id,
    as in CLIP, where open_clip pools at the argmax id."""
    chars = _bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars]
    merges = ["c a", "ca t</w>", "d o", "do g</w>"]
    for m in merges:
        vocab.append(m.replace(" ", ""))
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "model_max_length": 16,
        "do_lower_case": True}))
    return len(vocab)


def hf_to_open_clip(sd):
    """transformers CLIPModel keys -> open_clip keys, by hand (the inverse of precision/clip.py)."""
    out = {}
    for tower, src, dst in (("text", "text_model.encoder.layers.", "transformer.resblocks."),
                            ("vision", "vision_model.encoder.layers.", "visual.transformer.resblocks.")):
        i = 0
        while f"{src}{i}.layer_norm1.weight" in sd:
            s, d = f"{src}{i}.", f"{dst}{i}."
            for n in ("weight", "bias"):
                out[f"{d}ln_1.{n}"] = sd[f"{s}layer_norm1.{n}"]
                out[f"{d}ln_2.{n}"] = sd[f"{s}layer_norm2.{n}"]
                out[f"{d}attn.in_proj_{n}"] = torch.cat([sd[f"{s}self_attn.q_proj.{n}"], sd[f"{s}self_attn.k_proj.{n}"],
                                                         sd[f"{s}self_attn.v_proj.{n}"]])
                out[f"{d}attn.out_proj.{n}"] = sd[f"{s}self_attn.out_proj.{n}"]
                out[f"{d}mlp.c_fc.{n}"] = sd[f"{s}mlp.fc1.{n}"]
                out[f"{d}mlp.c_proj.{n}"] = sd[f"{s}mlp.fc2.{n}"]
            i += 1
    out["token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
    out["ln_final.weight"] = sd["text_model.final_layer_norm.weight"]
    out["ln_final.bias"] = sd["text_model.final_layer_norm.bias"]
    out["text_projection"] = sd["text_projection.weight"].T.contiguous()
    out["visual.class_embedding"] = sd["vision_model.embeddings.class_embedding"]
    out["visual.positional_embedding"] = sd["vision_model.embeddings.position_embedding.weight"]
    out["visual.conv1.weight"] = sd["vision_model.embeddings.patch_embedding.weight"]
    for a, b in (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm")):
        out[f"{a}.weight"], out[f"{a}.bias"] = sd[f"{b}.weight"], sd[f"{b}.bias"]
    out["visual.proj"] = sd["visual_projection.weight"].T.contiguous()
    out["logit_scale"] = sd["logit_scale"]
    out["attn_mask"] = torch.full((16, 16), float("-inf")).triu(1)      # open_clip's text mask buffer
    return out


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel
    root = tmp_path_factory.mktemp("clip")
    hf, oc = root / "hf", root / "open_clip"
    hf.mkdir()
    oc.mkdir()
    vocab = write_tiny_clip_tokenizer(hf)
    write_tiny_clip_tokenizer(oc)
    # 48-wide vision heads of 16 (3 heads), text heads of 16 (2 heads): head counts the mapping
    # can only learn from open_clip_config.json, so a wrong default would show.
    cfg = CLIPConfig(text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=16, hidden_act="gelu",
                                      eos_token_id=vocab - 1, bos_token_id=vocab - 2, pad_token_id=0),
                     vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                                        image_size=64, patch_size=16, hidden_act="gelu"),
                     projection_dim=24)
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():       # nothing left at ones/zeros
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() < 2 else p.shape[-1] ** -0.5) +
                    (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    model.save_pretrained(hf)
    torch.save(hf_to_open_clip(model.state_dict()), oc / "open_clip_pytorch_model.bin")
    (oc / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": 24, "vision_cfg": {"image_size": 64, "layers": 2, "width": 48, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": vocab, "width": 32, "heads": 2, "layers": 2}}}))
    images = root / "images"
    images.mkdir()
    rng = np.random.RandomState(0)
    for i, (w, h) in enumerate([(90, 64), (64, 120), (100, 100)]):
        Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")).save(images / f"im{i}.png")
    preds = {"a": {"im0.png": "a cat on a mat", "im1.png": "a dog", "im2.png": "cat cat dog"},
             "b": {"im0.png": "a dog on a mat", "im1.png": "two cats", "im2.png": "nothing here"}}
    files = []
    for k, v in preds.items():
        (root / f"{k}.json").write_text(json.dumps(v))
        files.append(root / f"{k}.json")
    return {"hf": hf, "oc": oc, "model": model, "images": images, "files": files, "preds": preds}


def test_open_clip_weights_map_onto_the_same_model(tiny_clip):
    a = judge_mod.ClipJudge.load(tiny_clip["hf"])
    b = judge_mod.ClipJudge.load(tiny_clip["oc"] / "open_clip_pytorch_model.bin")
    assert b.model.config.vision_config.num_attention_heads == 3 and b.model.config.text_config.num_attention_heads == 2
    img = tiny_clip["images"] / "im0.png"
    fa, fb = a.image_features(img), b.image_features(img)
    torch.testing.assert_close(fa, fb, rtol=1e-5, atol=1e-6)
    ta, tb = a.text_features("a cat on a mat"), b.text_features("a cat on a mat")
    torch.testing.assert_close(ta, tb, rtol=1e-5, atol=1e-6)
    # the score is the cosine of transformers' own projected features for these pixels and ids
    m = tiny_clip["model"]
    ids = a.tokenizer(["a cat on a mat"], return_tensors="pt")["input_ids"]
    assert ids[0, -1].item() == len(a.tokenizer) - 1            # pooled at end-of-text, the largest id
    with torch.no_grad():
        out = m(input_ids=ids, pixel_values=a.pixels(img))
    want = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).item()
    assert abs(a.score(fa, "a cat on a mat") - want) < 1e-5
    assert abs(b.score(fb, "a cat on a mat") - want) < 1e-5
    assert abs(a.score(fa, "a dog") - want) > 1e-3           # another caption, another score


def test_clipscore_cli_gives_the_same_scores_through_either_format(tiny_clip, tmp_path, capsys):
    reports = []
    for clip_path in (tiny_clip["hf"], tiny_clip["oc"]):
        out = tmp_path / f"{clip_path.name}.json"
        rc = cli.main(["clipscore", "--predictions", *map(str, tiny_clip["files"]), "--images", str(tiny_clip["images"]),
                       "--clip", str(clip_path), "--out", str(out), "--quiet"])
        stdout = capsys.readouterr().out
        assert rc == 0
        assert "mean" in stdout and "a.json" in stdout and "b.json" in stdout
        reports.append(json.loads(out.read_text()))
    hf, oc = reports
    for f in hf["per_image"]:
        assert set(hf["per_image"][f]) == {"im0.png", "im1.png", "im2.png"}
        for img, s in hf["per_image"][f].items():
            assert abs(s - oc["per_image"][f][img]) < 1e-5 and -1 <= s <= 1
        assert abs(hf["mean"][f] - oc["mean"][f]) < 1e-5
    a, b = (hf["mean"][str(f)] for f in tiny_clip["files"])
    assert abs(a - b) > 1e-4


def test_open_clip_keys_it_does_not_know_are_refused(tiny_clip):
    sd = torch.load(tiny_clip["oc"] / "open_clip_pytorch_model.bin", weights_only=True)
    sd["visual.attn_pool.query"] = torch.zeros(3)
    with pytest.raises(judge_mod.ClipError, match="attn_pool"):
        judge_mod.open_clip_to_hf(sd)
