#!/usr/bin/env python3
"""Train the demo model: a small InternVL2-architecture VLM that answers questions about
synthetic pictures (tools/demo_vqa.py), saved in the original OpenGVLab checkpoint format.

Run on demand, not in CI. The committed models/internvl-demo was made by one run with the
defaults (seed 0, 2 threads) on the idle 2-core AMD EPYC: 27.4 min (see
models/internvl-demo/TRAINING.md for the exact command line and its log):

    .venv/bin/python tools/train_demo_model.py

models/internvl-demo/TRAINING.md holds the run's log, with held-out accuracy along the way (on
96 questions; tools/demo_accuracy.py gives the 300-question numbers: 100%). Most of the time
goes to phase 1 (1600 steps) and phase 3 (800 steps). Another thread count gives other weights
(the sums are ordered differently): --threads 1 on a shared machine took 42.3 min, 99.7%. The
first committed model (88.0%, "Where is the ...?" 15/37: it found the shape but read its quadrant
poorly) differed in three ways: 3 key/value heads for the 6 heads (two heads shared values), no
where-head in the first phases, and 250 + 350 + 300 joint steps over three runs. Which change
mattered most was not measured separately.

Architecture (InternVL2, at toy width): InternViT-300M-style encoder (448 px tiles, patch 14,
LayerNorm, qkv bias), pixel shuffle v2 (downsample 0.5: 256 tokens per tile), the `mlp1`
projector, and an InternLM2 decoder (packed `wqkv`, one query head per KV head, RMSNorm, SwiGLU). It is trained as
transformers' InternVLForConditionalGeneration (Llama backbone, the same math) and converted to
the original format with InternLM2 names by compile/checkpoint/writer.py's `write_original`.

Tokenizer: a SentencePiece BPE model trained here on the question/answer texts and the chat
template (InternLM2 style: `<|im_start|>`/`<|im_end|>` inside the model, digits split), followed
by InternVL's added tokens (`<img>`, `</img>`, `<IMG_CONTEXT>`, `<quad>`, ...).

Training prompts are built by the runtime's own `templates.build_prompt("internlm2-chat", q, [1])`
(InternVL2's default system message included) and tokenized by the runtime's `Tokenizer`, so the
model sees exactly the token ids `internvl-run` will give it. Several questions share one picture
(its tokens are computed once; each question sees them through a block attention mask, the same
result as separate sequences). Three phases, because a small model trained end to end for half
an hour on a CPU learns neither to see nor to look (earlier attempts stalled at ~45%):
1. the language model learns to answer from a perfect encoder: each image token is the sum of
   learned vectors for the labels of its cell (demo_vqa's per-cell labels), no ViT at all;
2. the encoder (ViT + mlp1) learns to produce those vectors from the pixels (a regression, plus
   per-cell label classifiers that are not saved);
3. everything is trained together on the answers for a while, at a lower rate.
The answer loss (answer tokens and the closing `<|im_end|>`) gets two helpers on prompt positions,
which are never sampled from, so they cost nothing at inference:
- early answers: the positions from the word that settles the question ("circle" in "What colour
  is the circle?") to the end of the prompt predict the answer's first token too;
- attention targets: one head of the first layer at that word, and one head of the second layer
  at every later position, is trained to put 90% of its attention on the image tokens that hold
  the answer (the circle's cells, the word's first letter, ...). Finding them is otherwise the
  slowest thing for the model to learn, and the rest is easy once it has.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import demo_vqa  # noqa: E402
from internvl_aot.compile.checkpoint.writer import INTERNVL_TOKENS, write_original  # noqa: E402

from internvl_aot.runtime import image_tiling, templates  # noqa: E402
from internvl_aot.runtime.tokenizer import Tokenizer  # noqa: E402

TEMPLATE = "internlm2-chat"
# The words that settle a question (see Encoder.settle_index).
SETTLE_WORDS = demo_vqa.SHAPES + list(demo_vqa.COLOURS) + ["shape", "word", "number", "text"]
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


# ================================================================ tokenizer

def _added(first_id: int, names) -> dict:
    return {str(first_id + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                "single_word": False, "special": True} for i, t in enumerate(names)}


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """InternLM2-style SentencePiece BPE (tokenizer.model + tokenizer_config.json + added_tokens.json)."""
    import sentencepiece as spm
    t = templates.get_template(TEMPLATE)
    texts = demo_vqa.corpus() + [t.system_message, "system", "user", "assistant", "system\n" + t.system_message,
                                 "user\n", "assistant\n", "Please describe the image shortly.", "What is this?"]
    sentences = [s for s in texts for _ in range(20)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, user_defined_symbols=[IM_START, IM_END], character_coverage=1.0, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, num_threads=1,
        hard_vocab_limit=False, minloglevel=2)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    base = sp.get_piece_size()
    decoder = _added(0, ["<unk>"]) | _added(1, ["<s>"]) | _added(2, ["</s>"]) | _added(base, INTERNVL_TOKENS)
    for tok in (IM_START, IM_END):
        decoder |= _added(sp.piece_to_id(tok), [tok])
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "InternLM2Tokenizer", "added_tokens_decoder": decoder,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>",
        "add_bos_token": True, "add_eos_token": False, "model_max_length": 4096,
        "additional_special_tokens": [IM_START, IM_END] + INTERNVL_TOKENS}, indent=2))
    (out / "added_tokens.json").write_text(json.dumps({t: base + i for i, t in enumerate(INTERNVL_TOKENS)}))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}))


# ================================================================ model

def build_model(args, vocab_size: int, image_token_id: int):
    from transformers import InternVLConfig, InternVLForConditionalGeneration, LlamaConfig
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=args.llm_hidden, num_hidden_layers=args.llm_layers,
                       num_attention_heads=args.llm_hidden // 32, num_key_value_heads=args.llm_kv_heads,
                       intermediate_size=args.llm_mlp, rms_norm_eps=1e-5, max_position_embeddings=4096,
                       rope_theta=1_000_000.0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    vision = dict(hidden_size=args.vit_hidden, num_hidden_layers=args.vit_layers,
                  num_attention_heads=args.vit_hidden // 32, intermediate_size=4 * args.vit_hidden,
                  image_size=448, patch_size=14, layer_norm_eps=1e-6, norm_type="layer_norm",
                  attention_bias=True, use_qk_norm=False, hidden_act="gelu")
    cfg = InternVLConfig(text_config=text, vision_config=vision, image_token_id=image_token_id,
                         downsample_ratio=0.5, projector_hidden_act="gelu", vision_feature_layer=-1,
                         vision_feature_select_strategy="default",
                         tie_word_embeddings=False)  # top level: transformers 5 ties otherwise
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    model = InternVLForConditionalGeneration(cfg)
    # transformers starts the ViT's position embeddings at zero, which leaves "where" nearly
    # unlearnable in a short run: start them at a 2-D sine-cosine code instead (still trained).
    with torch.no_grad():
        pos = model.model.vision_tower.embeddings.position_embeddings
        pos.zero_()
        pos[0, 1:] = sincos_2d(448 // 14, args.vit_hidden)
    return model


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """[grid*grid, dim]: row-major patches, half the channels coding the row, half the column."""
    quarter = dim // 4
    freq = torch.arange(1, quarter + 1, dtype=torch.float32)         # k half-periods across the tile
    r, c = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                          indexing="ij")
    parts = []
    for coord in (r.flatten(), c.flatten()):
        a = coord[:, None] * freq[None] * (math.pi / grid)
        parts += [torch.sin(a), torch.cos(a)]
    out = torch.cat(parts, dim=1)
    return torch.cat([out, torch.zeros(out.shape[0], dim - out.shape[1])], dim=1)


class AuxHeads(torch.nn.Module):
    """Per-image-token classifiers of the cell labels of demo_vqa.LABELS on the projector output
    (training only, not saved)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.heads = torch.nn.ModuleList([torch.nn.Linear(hidden, n) for n in demo_vqa.LABELS.values()])

    def forward(self, feats, labels):          # feats [B, 256, H], labels [B, len(LABELS), 256]
        """Cross-entropy per channel; for the sparse channels, cells with and without a label are
        averaged apart (cells with one are few)."""
        loss = 0.0
        for i, (name, h) in enumerate(zip(demo_vqa.LABELS, self.heads)):
            y = labels[:, i].flatten()
            ce = F.cross_entropy(h(feats).flatten(0, 1), y, reduction="none")
            fg = y > 0
            loss = loss + ce[~fg].mean() + (ce[fg].mean() if fg.any() else 0.0)
        return loss

    @torch.no_grad()
    def accuracy(self, feats, labels) -> dict:
        """Per channel: accuracy on cells with a label (all cells for the counts)."""
        out = {}
        for i, (name, h) in enumerate(zip(demo_vqa.LABELS, self.heads)):
            y = labels[:, i].flatten()
            p = h(feats).flatten(0, 1).argmax(-1)
            on = y > 0
            out[name] = (p[on] == y[on]).float().mean().item() if on.any() else float("nan")
        return out


# ================================================================ batches

class Encoder:
    """Pictures and questions -> packed model inputs, with the runtime's template and tokenizer."""

    def __init__(self, tok: Tokenizer, where_head: int = 0):
        self.tok = tok
        self.where_head = where_head           # > 0: a second head trained for "where" questions
        self.im_end = tok.token_to_id(IM_END)
        self.img_end = tok.token_to_id(templates.IMG_END_TOKEN)
        self.img_ctx = tok.token_to_id(templates.IMG_CONTEXT_TOKEN)
        self._cache = {}

    def prompt_ids(self, question: str) -> list[int]:
        if question not in self._cache:
            text = templates.build_prompt(TEMPLATE, question, [1])
            self._cache[question] = self.tok.encode(text, add_bos=True)
        return self._cache[question]

    def answer_ids(self, answer: str) -> list[int]:
        key = ("answer", answer)
        if key not in self._cache:
            ids = self.tok.encode(answer, add_bos=False)
            assert self.tok.decode(ids, skip_special_tokens=True).strip() == answer, answer
            self._cache[key] = ids + [self.im_end]
        return self._cache[key]

    def settle_index(self, suffix: list) -> int:
        """Index in `suffix` (the question part of a prompt) of the token that settles the question:
        the last one naming the shape(s), colour, word, number or text it asks about ("Which shape
        is blue?": blue)."""
        end = suffix.index(self.im_end) - 1
        found = [i for i, t in enumerate(suffix[:end]) if any(w in self.tok.decode([t]) for w in SETTLE_WORDS)]
        return found[-1] if found else end

    def first_content(self, answer: list) -> int:
        """The answer's first token that is not a bare word-start piece ("3" is "▁", "3")."""
        for t in answer:
            if self.tok.decode([t]).strip():
                return t
        return answer[0]

    def pack(self, items: list):
        """items[b] = the (question, answer) pairs of picture b. Returns input_ids [B, L], positions [B, L],
        mask [B, 1, L, L] (bool, True = attend), targets [B, L] (-100 where no loss), early targets [B, L].

        Early targets: every prompt position from the token that settles the question (its keyword,
        the shape or colour it asks about, see settle_index) up to the one before the last is
        trained to predict the answer's first token as well (its first digit for a number). Prompt positions are never sampled
        from, so this costs nothing at inference; it lets the keyword's own position learn to look
        the answer up among the image tokens (its query comes straight from its embedding) and the
        positions after it to pass that on, which is otherwise the slowest thing to learn."""
        rows, attend = [], []
        for b, qas in enumerate(items):
            ids, pos, seg, tgt, early = [], [], [], [], []
            prefix = None
            for qi, (q, a) in enumerate(qas):
                full = self.prompt_ids(q)
                cut = full.index(self.img_end) + 1           # the shared part: system, user, image
                if prefix is None:
                    prefix = full[:cut]
                    ids += prefix
                    pos += list(range(cut))
                    seg += [0] * cut
                    tgt += [-100] * cut
                    early += [-100] * cut
                assert full[:cut] == prefix
                answer = self.answer_ids(a)
                suffix = full[cut:] + answer
                n_prompt = len(full) - cut
                ids += suffix
                pos += list(range(cut, cut + len(suffix)))
                seg += [qi + 1] * len(suffix)
                # position i predicts token i+1: the last prompt token predicts the first answer token
                tgt += [-100] * (n_prompt - 1) + suffix[n_prompt:] + [-100]
                k = self.settle_index(suffix)
                where = attend_spec(q)
                start = len(ids) - len(suffix)
                # the settling token, the positions after it and the answer positions but the last
                for i in range(k, len(suffix) - 1):
                    if where[0] in ("shapes", "count"):
                        # counting: head 1 + j looks at the counted cells in quadrant j (at the
                        # image start token if there are none), so the count is a sum of four
                        for j in range(4):
                            attend.append((b, start + i, False, where + (j,), 1 + j))
                        if where[0] == "shapes":
                            continue
                        spec = ("shape", where[1])
                    else:
                        spec = where
                    if where == ("tens",) and i >= n_prompt + 1:
                        spec = ("units",)     # the position that predicts the second digit
                    attend.append((b, start + i, i == k, spec, 0))
                    if q.startswith("Where") and self.where_head > 0:
                        # head 0's values carry colours, shapes, letters and digits; give the
                        # quadrant a head of its own
                        attend.append((b, start + i, i == k, spec, self.where_head))
                e = [-100] * len(suffix)
                e[k:n_prompt - 1] = [self.first_content(answer)] * (n_prompt - 1 - k)
                early += e
            rows.append((ids, pos, seg, tgt, early))
        L = max(len(r[0]) for r in rows)
        B = len(rows)
        input_ids = torch.full((B, L), self.tok.eos_id, dtype=torch.long)
        positions = torch.zeros((B, L), dtype=torch.long)
        targets = torch.full((B, L), -100, dtype=torch.long)
        earlies = torch.full((B, L), -100, dtype=torch.long)
        segs = torch.full((B, L), -1, dtype=torch.long)
        for b, (ids, pos, seg, tgt, early) in enumerate(rows):
            n = len(ids)
            input_ids[b, :n] = torch.tensor(ids)
            positions[b, :n] = torch.tensor(pos)
            targets[b, :n] = torch.tensor(tgt)
            earlies[b, :n] = torch.tensor(early)
            segs[b, :n] = torch.tensor(seg)
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        sq, sk = segs[:, :, None], segs[:, None, :]
        same = (sq == sk) | (sk == 0)                      # own question, or the shared prefix
        mask = causal[None] & same & (sq >= 0)
        mask |= torch.eye(L, dtype=torch.bool)[None]       # padding rows attend to themselves (no NaN)
        return input_ids, positions, mask[:, None], targets, earlies, attend


def attend_spec(question: str):
    """Which image tokens hold a question's answer: ("shape", i) / ("colour", i) = the cells of that
    shape / colour (1-based class), ("shapes",) every shape's cells, ("word",) the word's first
    letter, ("text",) all text, ("tens",) the tens digit (the units digit for the second digit),
    ("count", i) the cells of shape i, looked at per quadrant (see Encoder.pack)."""
    if question == demo_vqa.QUESTION["ink"]:
        return ("text",)
    if question == demo_vqa.QUESTION["word"]:
        return ("word",)
    if question == demo_vqa.QUESTION["number"]:
        return ("tens",)
    if question == demo_vqa.QUESTION["total"]:
        return ("shapes",)
    for i, c in enumerate(demo_vqa.COLOURS):
        if question == demo_vqa.QUESTION["shape"].format(c):
            return ("colour", 1 + i)
    for i, sh in enumerate(demo_vqa.SHAPES):
        if question in (demo_vqa.QUESTION["colour"].format(sh), demo_vqa.QUESTION["where"].format(sh)):
            return ("shape", 1 + i)
        if question == demo_vqa.QUESTION["count"].format(sh):
            return ("count", 1 + i)
    raise ValueError(question)


def target_cells(labels: torch.Tensor, spec) -> torch.Tensor:
    """labels [len(LABELS), 256] of one picture -> bool [256], the cells `spec` names."""
    ch = {name: i for i, name in enumerate(demo_vqa.LABELS)}
    if spec[0] in ("shape", "colour"):
        return labels[ch[spec[0]]] == spec[1]
    if spec[0] == "text":
        return labels[ch["shape"]] == 1 + len(demo_vqa.SHAPES)
    if spec[0] == "shapes":
        on = (labels[ch["shape"]] > 0) & (labels[ch["shape"]] <= len(demo_vqa.SHAPES))
        return on & (labels[ch["quadrant"]] == 1 + spec[1]) if len(spec) > 1 else on
    if spec[0] == "count":
        return (labels[ch["shape"]] == spec[1]) & (labels[ch["quadrant"]] == 1 + spec[2])
    return labels[ch[spec[0]]] > 0


class AttentionProbe:
    """Records the input of two attention layers, to compute one head's attention rows there and
    train them to look at the image tokens that hold the answer (see `attention_loss`)."""

    def __init__(self, model, first: int, late: int):
        self.layers = model.model.language_model.layers
        self.first, self.late = first, late
        self.inputs = {}
        for i in {first, late}:
            self.layers[i].self_attn.register_forward_pre_hook(self._hook(i), with_kwargs=True)

    def _hook(self, i):
        def hook(module, args, kwargs):
            self.inputs[i] = (kwargs["hidden_states"], kwargs["position_embeddings"])
        return hook

    def rows(self, layer: int, head: int, b: torch.Tensor, q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention probabilities [n, L] of `head` at (batch b, position q)."""
        attn = self.layers[layer].self_attn
        h, (cos, sin) = self.inputs[layer]
        d, kv = attn.head_dim, head // attn.num_key_value_groups
        qs = F.linear(h[b, q], attn.q_proj.weight[head * d:(head + 1) * d])                 # [n, d]
        ks = F.linear(h, attn.k_proj.weight[kv * d:(kv + 1) * d])                            # [B, L, d]

        def rope(x, c, s_):
            x1, x2 = x[..., :d // 2], x[..., d // 2:]
            return x * c + torch.cat([-x2, x1], -1) * s_
        qs = rope(qs, cos[b, q], sin[b, q])
        ks = rope(ks, cos, sin)[b]                                                           # [n, L, d]
        scores = (qs[:, None] * ks).sum(-1) * attn.scaling
        scores = scores.masked_fill(~mask[b, 0, q], float("-inf"))
        return scores.softmax(-1)


def attention_loss(probe: AttentionProbe, input_ids, mask, attend, labels, img_ctx: int):
    """-log(attention mass on the answer's image tokens, up to 90%), for the settling token in the first
    probed layer (head 0) and for every position from it to the answer's end in the late one
    (head 0, and heads 1-4 for counts). A counting head with nothing to count looks at `<img>`."""
    img_pos = (input_ids[0] == img_ctx).nonzero().flatten()          # the same prefix in every row
    sink = int(img_pos[0]) - 1                                        # <img>
    groups = {}
    for a in attend:
        if a[2]:
            groups.setdefault((probe.first, a[4]), []).append(a)
        groups.setdefault((probe.late, a[4]), []).append(a)
    loss = 0.0
    for (layer, head), rows in groups.items():
        b = torch.tensor([r[0] for r in rows])
        q = torch.tensor([r[1] for r in rows])
        want = torch.zeros(len(rows), input_ids.shape[1], dtype=torch.bool)
        for j, r in enumerate(rows):
            want[j, img_pos] = target_cells(labels[r[0]], r[3])
            if r[4] > 0 and not want[j].any():
                want[j, sink] = True
        ok = want.any(-1)                                            # a text cell can be missing
        p = probe.rows(layer, head, b[ok], q[ok], mask)
        # no gradient once 90% of the mass is there: pushing further only inflates the query
        loss = loss + (-torch.log((p * want[ok]).sum(-1) + 1e-6)).clamp(min=-math.log(0.9)).mean()
    return loss / max(len(groups), 1)


def pixel_values(images) -> torch.Tensor:
    return torch.cat([torch.from_numpy(image_tiling.image_to_tiles(im, dynamic_image_size=True, use_thumbnail=True,
                                                                    min_num=1, max_num=1)) for im in images])


def image_features(model, images) -> torch.Tensor:
    """[B, 256, H_llm]: ViT -> drop CLS -> pixel shuffle -> mlp1, as the compiled vision stage does."""
    return model.model.get_image_features(pixel_values=pixel_values(images), vision_feature_layer=-1,
                                          vision_feature_select_strategy="default").pooler_output


def forward(model, enc: Encoder, feats, items, probe=None, labels=None):
    """feats: image features per picture. -> (answer loss, early loss, attention loss, logits at the
    answer targets, the targets there, the targets [B, L])."""
    input_ids, positions, mask, targets, earlies, attend = enc.pack(items)
    lm = model.model.language_model
    embeds = lm.embed_tokens(input_ids)
    img_mask = (input_ids == enc.img_ctx)[..., None].expand_as(embeds)
    embeds = embeds.masked_scatter(img_mask, feats.to(embeds.dtype))
    hidden = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
    sel = targets >= 0
    logits = model.lm_head(hidden[sel])
    loss = F.cross_entropy(logits, targets[sel])
    esel = earlies >= 0
    early_loss = F.cross_entropy(model.lm_head(hidden[esel]), earlies[esel]) if esel.any() else loss * 0
    att_loss = loss * 0
    if probe is not None and attend:
        att_loss = attention_loss(probe, input_ids, mask, attend, labels, enc.img_ctx)
    return loss, early_loss, att_loss, logits, targets[sel], targets


@torch.no_grad()
def evaluate(model, enc: Encoder, data, feats_fn, batch: int = 16) -> dict:
    """data: [(example, question, answer, kind)]. Exact-match accuracy with teacher forcing (= greedy
    exact match: every answer token, and the closing <|im_end|>, must be the argmax), overall and per kind."""
    model.eval()
    right, per_kind = 0, {}
    for i in range(0, len(data), batch):
        chunk = data[i:i + batch]
        feats = feats_fn([d[0] for d in chunk])
        _, _, _, logits, tgt, targets = forward(model, enc, feats, [[(d[1], d[2])] for d in chunk])
        ok = (logits.argmax(-1) == tgt)
        counts = (targets >= 0).sum(1).tolist()
        k = 0
        for d, n in zip(chunk, counts):
            good = bool(ok[k:k + n].all())
            k += n
            right += good
            r = per_kind.setdefault(d[3], [0, 0])
            r[0] += good
            r[1] += 1
    model.train()
    return {"accuracy": right / len(data), **{k: v[0] / v[1] for k, v in per_kind.items()}}


def eval_set(seed: int, n: int) -> list:
    """Like demo_vqa.questions, keeping the examples (their labels): [(example, question, answer, kind)]."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = demo_vqa.KINDS[i % len(demo_vqa.KINDS)]
        ex = demo_vqa.example(rng, kind)
        _, q, a = rng.choice([qa for qa in ex.qas if qa[0] == kind])
        out.append((ex, q, a, kind))
    return out


class LabelFeatures(torch.nn.Module):
    """A perfect encoder's output: per cell, the sum of one learned vector per label channel. Phase 1
    trains the language model on these; phase 2 trains the real encoder to produce them."""

    def __init__(self, hidden: int):
        super().__init__()
        self.tables = torch.nn.ModuleList([torch.nn.Embedding(n, hidden) for n in demo_vqa.LABELS.values()])
        with torch.no_grad():
            for t in self.tables:
                t.weight.mul_(0.3)

    def forward(self, labels):                 # [B, len(LABELS), 256] -> [B, 256, H]
        return sum(t(labels[:, i]) for i, t in enumerate(self.tables))


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine down to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def picture_questions(rng: random.Random, ex, n: int) -> list:
    """Up to n of a picture's (question, answer) pairs, round-robin over its kinds (as varied as possible)."""
    by_kind = {}
    for k, q, a in ex.qas:
        by_kind.setdefault(k, []).append((q, a))
    for qs in by_kind.values():
        rng.shuffle(qs)
    kinds = list(by_kind)
    rng.shuffle(kinds)
    picked = [by_kind[k][r] for r in range(max(map(len, by_kind.values()))) for k in kinds if r < len(by_kind[k])]
    return picked[:n]


def cell_labels(examples) -> torch.Tensor:
    return torch.from_numpy(np.stack([ex.labels.reshape(len(demo_vqa.LABELS), -1) for ex in examples]))


def save_checkpoint(model, tok_dir: Path, out: Path, args, log: list[str]):
    """-hf save_pretrained, then the original OpenGVLab format (InternLM2 names, packed wqkv)."""
    hf = tok_dir.parent / "hf"
    if hf.exists():
        shutil.rmtree(hf)
    model.save_pretrained(hf)
    for name in ("tokenizer.model", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json"):
        shutil.copy(tok_dir / name, hf / name)
    if out.exists():
        shutil.rmtree(out)
    write_original(hf, out, "internlm2")
    cfg = json.loads((out / "config.json").read_text())
    # One 448x448 tile per picture (a single tile gets no thumbnail).
    cfg.update(max_dynamic_patch=1, min_dynamic_patch=1, template=TEMPLATE, _name_or_path="internvl-demo")
    cfg["llm_config"]["_name_or_path"] = "internvl-demo-llm"
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "TRAINING.md").write_text("\n".join(log) + "\n")
    image, question, answer = demo_vqa.demo_picture()
    image.save(out / "demo.png")
    (out / "demo.json").write_text(json.dumps({"image": "demo.png", "question": question, "answer": answer}) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "models" / "internvl-demo"))
    ap.add_argument("--work", default=str(ROOT / "build" / "train-demo"), help="tokenizer, -hf copy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--llm-steps", type=int, default=1600, help="phase 1: the language model on label features")
    ap.add_argument("--vision-steps", type=int, default=350, help="phase 2: the encoder learns the label features")
    ap.add_argument("--joint-steps", type=int, default=800, help="phase 3: everything on the answers")
    ap.add_argument("--batch", type=int, default=8, help="pictures per step (phases 1, 3)")
    ap.add_argument("--vision-batch", type=int, default=16, help="pictures per step (phase 2)")
    ap.add_argument("--questions", type=int, default=6, help="questions per picture")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--vision-lr", type=float, default=2e-3)
    ap.add_argument("--joint-lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--aux-weight", type=float, default=0.5)
    ap.add_argument("--early-weight", type=float, default=0.5)
    ap.add_argument("--attention-weight", type=float, default=0.5)
    ap.add_argument("--vit-hidden", type=int, default=96)
    ap.add_argument("--vit-layers", type=int, default=2)
    ap.add_argument("--llm-hidden", type=int, default=192)
    ap.add_argument("--llm-layers", type=int, default=3)
    ap.add_argument("--llm-mlp", type=int, default=512)
    ap.add_argument("--llm-kv-heads", type=int, default=6, help="key/value heads of the LLM (of llm_hidden / 32 heads)")
    ap.add_argument("--vision-answer-weight", type=float, default=0.0,
                    help="> 0: phase 2 also trains the encoder on the frozen language model's answer losses")
    ap.add_argument("--vocab", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-size", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--continue-from", default=None,
                    help="an -hf checkpoint (<work>/hf of an earlier run, copied elsewhere) to start from, with its "
                         "TRAINING.md; use with --llm-steps 0 --vision-steps 0 for more joint steps (no feature anchor)")
    ap.add_argument("--where-head", type=int, default=5,
                    help="> 0 (0: none): this attention head of the second layer is also trained to find the shape a "
                         "'where' question names (head 0's values carry everything else)")
    args = ap.parse_args(argv)

    if hasattr(os, "nice") and os.nice(0) == 0:
        os.nice(10)                                  # leave the machine usable for others
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work, out = Path(args.work), Path(args.out)
    tok_dir = work / "tokenizer"
    if work.exists():
        shutil.rmtree(work)
    tok_dir.mkdir(parents=True, exist_ok=True)
    write_tokenizer(tok_dir, args.vocab)
    tok = Tokenizer.from_dir(tok_dir)
    enc = Encoder(tok, args.where_head)
    model = build_model(args, len(tok), enc.img_ctx)
    earlier = []
    if args.continue_from:
        from safetensors.torch import load_file
        src = Path(args.continue_from)
        sd = {}
        for f in sorted(src.glob("*.safetensors")):
            sd.update(load_file(str(f)))
        own = model.state_dict()
        names = {k: k for k in own}
        for k in own:                          # save_pretrained's on-disk names (4.5x layout)
            for a, b in (("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."),
                         ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")):
                if k.startswith(a):
                    names[k] = b + k[len(a):]
        missing = [k for k in own if names[k] not in sd and k not in sd]
        assert not missing, missing[:5]
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(sd[names[k]] if names[k] in sd else sd[k])
        earlier = (src / "TRAINING.md").read_text().splitlines() + [""] if (src / "TRAINING.md").is_file() else []
    label_feats = LabelFeatures(args.llm_hidden)
    aux = AuxHeads(args.llm_hidden)
    probe = AttentionProbe(model, first=0, late=1)
    vision = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    vision_ids = {id(p) for p in vision}
    llm = [p for p in model.parameters() if id(p) not in vision_ids]
    rng = random.Random(args.seed)
    log = earlier + [f"# internvl-demo training log" + (" (continued)" if earlier else ""), "",
           f"command: {' '.join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))}",
           f"arguments: {json.dumps(vars(args))}",
           f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
           f"{torch.__version__}, {args.threads} threads", ""]
    n_params = sum(p.numel() for p in model.parameters())
    msg = (f"model: {n_params / 1e6:.2f} M parameters (ViT {args.vit_hidden}x{args.vit_layers}, LLM "
           f"{args.llm_hidden}x{args.llm_layers}, vocab {len(tok)}); prompt {len(enc.prompt_ids('What word is written?'))} tokens")
    print(msg)
    log.append(msg)
    eval_data = eval_set(10_000 + args.seed, args.eval_size)       # a different seed from training
    elapsed = 0.0

    def real_feats(examples):
        return image_features(model, [ex.image for ex in examples])

    def fake_feats(examples):
        return label_feats(cell_labels(examples))

    def adamw(params, lr):
        return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
                                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                 lr=lr, betas=(0.9, 0.98), eps=1e-8)

    def note(line):
        print(line, flush=True)
        log.append("- " + line)

    def run_phase(name, steps, params, lr, step_fn, feats_fn):
        nonlocal elapsed
        opt = adamw(params, lr)
        t_last = time.perf_counter()
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, lr, args.warmup)
            losses = step_fn()
            opt.zero_grad(set_to_none=True)
            sum(w * l for w, l in losses.values()).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            now = time.perf_counter()
            elapsed += now - t_last
            t_last = now
            done = step + 1
            if done % 20 == 0 or done == 1:
                print(f"{name} step {done}/{steps} " + " ".join(f"{k} {l.item():.4f}" for k, (_, l) in losses.items())
                      + f" ({elapsed:.0f} s)", flush=True)
            if done % args.eval_every == 0 or done == steps:
                t0 = time.perf_counter()
                line = f"{name} step {done}: {elapsed:.0f} s"
                if feats_fn is real_feats:
                    model.eval()
                    exs = [d[0] for d in eval_data[:48]]
                    with torch.no_grad():
                        cells = aux.accuracy(real_feats(exs), cell_labels(exs))
                    model.train()
                    line += ", per-cell label accuracy " + ", ".join(f"{k} {v:.2f}" for k, v in cells.items())
                acc = evaluate(model, enc, eval_data, feats_fn)
                line += ", held-out exact match " + ", ".join(f"{k} {v:.2f}" for k, v in acc.items())
                note(line)
                t_last += time.perf_counter() - t0        # evaluation time is not training time

    def answer_losses(feats_fn, examples=None, feats=None):
        if examples is None:
            examples = [demo_vqa.training_example(rng) for _ in range(args.batch)]
        items = [picture_questions(rng, ex, args.questions) for ex in examples]
        labels = cell_labels(examples)
        if feats is None:
            feats = feats_fn(examples)
        loss, early, att, _, _, _ = forward(model, enc, feats, items, probe, labels)
        out = {"answer": (1.0, loss), "early": (args.early_weight, early), "attention": (args.attention_weight, att)}
        return out, feats, labels

    # Phase 1: the language model learns to answer from a perfect encoder's output (cheap: no ViT).
    run_phase("llm", args.llm_steps, llm + list(label_feats.parameters()), args.lr,
              lambda: answer_losses(fake_feats)[0], fake_feats)

    # Phase 2: the encoder (ViT + mlp1) learns to produce those features from the pixels.
    for p in label_feats.parameters():
        p.requires_grad_(False)

    def vision_step():
        examples = [demo_vqa.training_example(rng) for _ in range(args.vision_batch)]
        labels = cell_labels(examples)
        feats = real_feats(examples)
        target = label_feats(labels)
        out = {"match": (1.0, F.mse_loss(feats, target) / target.pow(2).mean()),
               "aux": (args.aux_weight, aux(feats, labels))}
        if args.vision_answer_weight > 0:
            # the frozen language model's losses on some of these pictures: the features must also
            # work for it, not only be near the label features (small parts of them, such as the
            # quadrant, count for little in the regression but decide "where" questions)
            n = args.batch
            ans = answer_losses(real_feats, examples[:n], feats[:n])[0]
            for k, (w, l) in ans.items():
                out["vision " + k] = (args.vision_answer_weight * w, l)
        return out
    for p in llm:
        p.requires_grad_(False)
    run_phase("vision", args.vision_steps, vision + list(aux.parameters()), args.vision_lr, vision_step, real_feats)
    for p in llm:
        p.requires_grad_(True)

    # Phase 3: everything together on the answers, the encoder kept near the label features.
    def joint_step():
        out, feats, labels = answer_losses(real_feats)
        if not args.continue_from:             # the label features of phase 1 are not saved
            target = label_feats(labels)
            out["match"] = (1.0, F.mse_loss(feats, target) / target.pow(2).mean())
        out["aux"] = (args.aux_weight, aux(feats, labels))
        return out
    run_phase("joint", args.joint_steps, list(model.parameters()) + list(aux.parameters()), args.joint_lr,
              joint_step, real_feats)

    total_steps = args.llm_steps + args.vision_steps + args.joint_steps
    log += ["", f"trained {total_steps} steps in {elapsed / 60:.1f} min"]
    save_checkpoint(model, tok_dir, out, args, log)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.1f} MB) after {elapsed / 60:.1f} min of training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
