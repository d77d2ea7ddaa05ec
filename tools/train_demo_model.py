#!/usr/bin/env python3
"""Train the demo model: a small InternVL2-architecture VLM that answers questions about
synthetic pictures (tools/demo_vqa.py), saved in the original OpenGVLab checkpoint format.

Run on demand, not in CI. The committed models/internvl-demo was made with

    nice -n 10 .venv/bin/python tools/train_demo_model.py --out models/internvl-demo

(seed 0, the defaults below; about 25 minutes on a shared 2-core AMD EPYC, see
models/internvl-demo/TRAINING.md for the log of that run).

Architecture (InternVL2, at toy width): InternViT-300M-style encoder (448 px tiles, patch 14,
LayerNorm, qkv bias), pixel shuffle v2 (downsample 0.5: 256 tokens per tile), the `mlp1`
projector, and an InternLM2 decoder (packed `wqkv`, GQA, RMSNorm, SwiGLU). It is trained as
transformers' InternVLForConditionalGeneration (Llama backbone, the same math) and converted to
the original format with InternLM2 names by tests/tiny_checkpoints.py's `write_original`.

Tokenizer: a SentencePiece BPE model trained here on the question/answer texts and the chat
template (InternLM2 style: `<|im_start|>`/`<|im_end|>` inside the model, digits split), followed
by InternVL's added tokens (`<img>`, `</img>`, `<IMG_CONTEXT>`, `<quad>`, ...).

Training prompts are built by the runtime's own `templates.build_prompt("internlm2-chat", q, [1])`
(InternVL2's default system message included) and tokenized by the runtime's `Tokenizer`, so the
model sees exactly the token ids `internvl-run` will give it. The loss is on the answer tokens
and the closing `<|im_end|>`. Two things make it learn fast on a CPU:
- several questions share one picture: the picture's tokens are computed once and each question
  attends to them through a block attention mask (the same result as separate sequences);
- an auxiliary per-token loss: small linear heads (not saved) read the colour, shape and letter
  under each of the 256 image tokens from the projector output, which trains the vision side
  densely from the first step.
Checkpoints go to <work>/state.pt every --save-every steps; --resume continues from there.
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
sys.path.insert(0, str(ROOT / "tests"))

import demo_vqa  # noqa: E402
from tiny_checkpoints import INTERNVL_TOKENS, write_original  # noqa: E402

from internvl_aot.runtime import image_tiling, templates  # noqa: E402
from internvl_aot.runtime.tokenizer import Tokenizer  # noqa: E402

TEMPLATE = "internlm2-chat"
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
                       num_attention_heads=args.llm_hidden // 32, num_key_value_heads=args.llm_hidden // 64,
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
    """Per-image-token colour / shape / character / quadrant classifiers on the projector output (training only)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.heads = torch.nn.ModuleList([torch.nn.Linear(hidden, n) for n in demo_vqa.LABEL_CLASSES])

    def forward(self, feats, labels):          # feats [B, 256, H], labels [B, 4, 256]
        # Cells on an object or a letter are few: average their loss and the background's separately.
        loss = 0.0
        for i, h in enumerate(self.heads):
            ce = F.cross_entropy(h(feats).flatten(0, 1), labels[:, i].flatten(), reduction="none")
            fg = labels[:, i].flatten() > 0
            loss = loss + ce[~fg].mean() + (ce[fg].mean() if fg.any() else 0.0)
        return loss


# ================================================================ batches

class Encoder:
    """Pictures and questions -> packed model inputs, with the runtime's template and tokenizer."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
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

    def keyword_id(self, question: str):
        """The token of the shape or colour a question asks about (None if it names none)."""
        key = ("keyword", question)
        if key not in self._cache:
            words = [w for w in demo_vqa.SHAPES + list(demo_vqa.COLOURS) if w in question]
            self._cache[key] = self.tok.encode(words[0], add_bos=False)[0] if words else None
        return self._cache[key]

    def pack(self, items: list[list[tuple[str, str]]]):
        """items[b] = the (question, answer) pairs of picture b. Returns input_ids [B, L], positions [B, L],
        mask [B, 1, L, L] (bool, True = attend), targets [B, L] (-100 where no loss), echo targets [B, L].

        Echo targets: the prompt positions between a question's keyword (the shape or colour it asks
        about) and the last prompt position are trained to predict that keyword. Prompt positions are
        never sampled from, so this costs the model nothing at inference; it teaches the end of the
        prompt to find the keyword among ~270 earlier tokens, the slowest thing to learn otherwise."""
        rows = []
        for qas in items:
            ids, pos, seg, tgt, echo = [], [], [], [], []
            prefix = None
            spans = []
            for qi, (q, a) in enumerate(qas):
                full = self.prompt_ids(q)
                cut = full.index(self.img_end) + 1           # the shared part: system, user, image
                if prefix is None:
                    prefix = full[:cut]
                    ids += prefix
                    pos += list(range(cut))
                    seg += [0] * cut
                    tgt += [-100] * cut
                    echo += [-100] * cut
                assert full[:cut] == prefix
                suffix = full[cut:] + self.answer_ids(a)
                n_prompt = len(full) - cut
                start = len(ids)
                ids += suffix
                pos += list(range(cut, cut + len(suffix)))
                seg += [qi + 1] * len(suffix)
                # position i predicts token i+1: the last prompt token predicts the first answer token
                tgt += [-100] * (n_prompt - 1) + suffix[n_prompt:] + [-100]
                kw = self.keyword_id(q)
                e = [-100] * len(suffix)
                if kw is not None:
                    k = suffix.index(kw)
                    e[k + 1:n_prompt - 1] = [kw] * (n_prompt - 2 - k)
                echo += e
            rows.append((ids, pos, seg, tgt, echo))
        L = max(len(r[0]) for r in rows)
        B = len(rows)
        input_ids = torch.full((B, L), self.tok.eos_id, dtype=torch.long)
        positions = torch.zeros((B, L), dtype=torch.long)
        targets = torch.full((B, L), -100, dtype=torch.long)
        echoes = torch.full((B, L), -100, dtype=torch.long)
        segs = torch.full((B, L), -1, dtype=torch.long)
        for b, (ids, pos, seg, tgt, echo) in enumerate(rows):
            n = len(ids)
            input_ids[b, :n] = torch.tensor(ids)
            positions[b, :n] = torch.tensor(pos)
            targets[b, :n] = torch.tensor(tgt)
            echoes[b, :n] = torch.tensor(echo)
            segs[b, :n] = torch.tensor(seg)
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        sq, sk = segs[:, :, None], segs[:, None, :]
        same = (sq == sk) | (sk == 0)                      # own question, or the shared prefix
        mask = causal[None] & same & (sq >= 0)
        mask |= torch.eye(L, dtype=torch.bool)[None]       # padding rows attend to themselves (no NaN)
        return input_ids, positions, mask[:, None], targets, echoes


def pixel_values(images) -> torch.Tensor:
    return torch.cat([torch.from_numpy(image_tiling.image_to_tiles(im, dynamic_image_size=True, use_thumbnail=True,
                                                                    min_num=1, max_num=1)) for im in images])


def forward(model, enc: Encoder, images, items, labels=None, aux=None):
    """-> (answer loss, aux loss or None, echo loss, logits at the target positions, targets there, targets)."""
    input_ids, positions, mask, targets, echoes = enc.pack(items)
    feats = model.model.get_image_features(pixel_values=pixel_values(images), vision_feature_layer=-1,
                                           vision_feature_select_strategy="default").pooler_output
    lm = model.model.language_model
    embeds = lm.embed_tokens(input_ids)
    img_mask = (input_ids == enc.img_ctx)[..., None].expand_as(embeds)
    embeds = embeds.masked_scatter(img_mask, feats.to(embeds.dtype))
    hidden = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
    sel = targets >= 0
    logits = model.lm_head(hidden[sel])
    loss = F.cross_entropy(logits, targets[sel])
    esel = echoes >= 0
    echo_loss = F.cross_entropy(model.lm_head(hidden[esel]), echoes[esel]) if esel.any() else loss * 0
    aux_loss = aux(feats, labels) if aux is not None else None
    return loss, aux_loss, echo_loss, logits, targets[sel], targets


@torch.no_grad()
def evaluate(model, enc: Encoder, data, batch: int = 16) -> dict:
    """Exact-match accuracy with teacher forcing (= greedy exact match: every answer token, and the
    closing <|im_end|>, must be the argmax), overall and per kind."""
    model.eval()
    right, per_kind = 0, {}
    for i in range(0, len(data), batch):
        chunk = data[i:i + batch]
        _, _, _, logits, tgt, targets = forward(model, enc, [d[0] for d in chunk], [[(d[1], d[2])] for d in chunk])
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


# ================================================================ main

def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    p = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


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
    ap.add_argument("--work", default=str(ROOT / "build" / "train-demo"), help="tokenizer, checkpoints, -hf copy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=8, help="pictures per step")
    ap.add_argument("--questions", type=int, default=6, help="questions per picture")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--aux-weight", type=float, default=0.5)
    ap.add_argument("--echo-weight", type=float, default=0.5)
    ap.add_argument("--vit-hidden", type=int, default=96)
    ap.add_argument("--vit-layers", type=int, default=2)
    ap.add_argument("--llm-hidden", type=int, default=192)
    ap.add_argument("--llm-layers", type=int, default=3)
    ap.add_argument("--llm-mlp", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-size", type=int, default=96)
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)

    if hasattr(os, "nice") and os.nice(0) == 0:
        os.nice(10)                                  # leave the machine usable for others
    torch.set_num_threads(args.threads)
    work, out = Path(args.work), Path(args.out)
    tok_dir = work / "tokenizer"
    state_path = work / "state.pt"
    if not args.resume and work.exists():
        shutil.rmtree(work)
    tok_dir.mkdir(parents=True, exist_ok=True)
    if not (tok_dir / "tokenizer.model").is_file():
        write_tokenizer(tok_dir, args.vocab)
    tok = Tokenizer.from_dir(tok_dir)
    enc = Encoder(tok)
    model = build_model(args, len(tok), enc.img_ctx)
    aux = AuxHeads(args.llm_hidden)
    params = list(model.parameters()) + list(aux.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    rng = random.Random(args.seed)
    step, elapsed = 0, 0.0
    log = [f"# internvl-demo training log", "",
           f"command: {' '.join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))}",
           f"arguments: {json.dumps(vars(args))}",
           f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
           f"{torch.__version__}, {args.threads} threads", ""]
    if args.resume and state_path.is_file():
        st = torch.load(state_path, weights_only=False)
        model.load_state_dict(st["model"])
        aux.load_state_dict(st["aux"])
        opt.load_state_dict(st["opt"])
        rng.setstate(st["rng"])
        torch.set_rng_state(st["torch_rng"])
        step, elapsed, log = st["step"], st["elapsed"], st["log"]
        print(f"resumed at step {step} ({elapsed:.0f} s so far)")
    n_params = sum(p.numel() for p in model.parameters())
    msg = (f"model: {n_params / 1e6:.2f} M parameters (ViT {args.vit_hidden}x{args.vit_layers}, LLM "
           f"{args.llm_hidden}x{args.llm_layers}, vocab {len(tok)}); prompt {len(enc.prompt_ids('What word is written?'))} tokens")
    print(msg)
    if step == 0:
        log.append(msg)
    eval_data = demo_vqa.questions(10_000 + args.seed, args.eval_size)   # a different seed from training
    model.train()
    t_last = time.perf_counter()
    while step < args.steps:
        examples = [demo_vqa.training_example(rng) for _ in range(args.batch)]
        items = []
        for ex in examples:
            by_kind = {}
            for k, q, a in ex.qas:
                by_kind.setdefault(k, []).append((q, a))
            for qs in by_kind.values():
                rng.shuffle(qs)
            kinds = list(by_kind)
            rng.shuffle(kinds)
            # round-robin over the kinds, so a picture's questions are as varied as possible
            picked = [by_kind[k][r] for r in range(max(map(len, by_kind.values())))
                      for k in kinds if r < len(by_kind[k])]
            items.append(picked[:args.questions])
        labels = torch.from_numpy(np.stack([ex.labels.reshape(len(demo_vqa.LABEL_CLASSES), -1) for ex in examples]))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        loss, aux_loss, echo_loss, _, _, _ = forward(model, enc, [ex.image for ex in examples], items, labels, aux)
        total = loss + args.aux_weight * aux_loss + args.echo_weight * echo_loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        now = time.perf_counter()
        elapsed += now - t_last
        t_last = now
        if step % 10 == 0 or step == 1:
            print(f"step {step}/{args.steps} loss {loss.item():.4f} aux {aux_loss.item():.4f} echo {echo_loss.item():.4f} "
                  f"lr {lr_at(step - 1, args):.2e} ({elapsed:.0f} s)", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            t0 = time.perf_counter()
            acc = evaluate(model, enc, eval_data)
            line = (f"step {step}: {elapsed:.0f} s, loss {loss.item():.4f}, held-out exact match "
                    + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()))
            print(line, flush=True)
            log.append("- " + line)
            t_last += time.perf_counter() - t0        # evaluation time is not training time
        if step % args.save_every == 0 and step < args.steps:
            torch.save({"model": model.state_dict(), "aux": aux.state_dict(), "opt": opt.state_dict(),
                        "rng": rng.getstate(), "torch_rng": torch.get_rng_state(), "step": step,
                        "elapsed": elapsed, "log": log}, state_path)
    log += ["", f"trained {args.steps} steps in {elapsed / 60:.1f} min"]
    save_checkpoint(model, tok_dir, out, args, log)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.1f} MB) after {elapsed / 60:.1f} min of training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
