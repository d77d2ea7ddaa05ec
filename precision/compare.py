"""`internvl-eval compare`: does an artifact still answer like the original model, and by how much
does it differ?

Inputs are (image, question) pairs: every image of `--images` with each question of `--questions`
(a text file, one question a line; default "Describe the image in detail."), or a jsonl whose lines
name `image` and `question` (the TextVQA format; images relative to the jsonl or to `--images`).

The side under test is an artifact (or, for development, a checkpoint's eager graphs). The
reference is a checkpoint, run by transformers (precision/reference.py, fp32 on the CPU by
default, fed the artifact's prompt ids and tiles), or another artifact, which tokenizes and tiles
for itself (a prompt that differs is reported). Per input:
- greedy outputs (both stop at the artifact's stop tokens, or `--ignore-eos`): identical or not,
  the step of the first divergence (0 = the first new token), and the share of equal positions;
- the first token's logits (the prefill's output): cosine, max |difference|, argmax equal;
- vision embeddings (the projector's output, the LLM's image tokens) where both sides expose them:
  relative error ||a - b|| / ||b|| and max |difference|.
Overall: counts and fractions, min/mean cosine, the largest differences. `--fail-under` and
`--fail-over` bounds make the exit status non-zero when crossed, for CI.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..runtime.engine import Request
from ..runtime.sampler import SamplingParams
from .engines import probe

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
DEFAULT_QUESTION = "Describe the image in detail."
# name -> (summary key, "min" bound (--fail-under) or "max" bound (--fail-over))
BOUNDS = {"identical": ("identical_frac", "min"), "agreement": ("mean_agreement", "min"),
          "cosine": ("min_logit_cosine", "min"), "top1": ("top1_frac", "min"),
          "logit_max_abs": ("max_logit_abs_diff", "max"), "vision_rel_err": ("max_vision_rel_err", "max")}


@dataclass
class Input:
    name: str            # the image's file name (predictions files are keyed by it), or "text-<i>"
    image: str | None
    question: str


def list_inputs(images: str | None, questions: str | None, limit: int | None = None) -> list[Input]:
    folder = Path(images) if images else None
    out: list[Input] = []
    if questions and Path(questions).suffix == ".jsonl":
        base = Path(questions).parent
        for line in Path(questions).read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            img = Path(row["image"])
            if not img.is_absolute():
                img = folder / img.name if folder and (folder / img.name).is_file() else base / img
            out.append(Input(img.name, str(img), row["question"]))
    else:
        qs = [q.strip() for q in Path(questions).read_text().splitlines() if q.strip()] if questions \
            else [DEFAULT_QUESTION]
        if folder is None:
            out = [Input(f"text-{i}", None, q) for i, q in enumerate(qs)]
        else:
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise SystemExit(f"no images in {folder}")
            out = [Input(p.name if len(qs) == 1 else f"{p.name}#{j}", str(p), q)
                   for p in files for j, q in enumerate(qs)]
    return out[:limit] if limit else out


def _divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def token_metrics(a: list[int], b: list[int]) -> dict:
    n = max(len(a), len(b), 1)
    return {"identical": a == b, "first_divergence": _divergence(a, b),
            "agreement": sum(x == y for x, y in zip(a, b)) / n, "tokens": len(a), "ref_tokens": len(b)}


def logit_metrics(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.double(), b.double()
    return {"logit_cosine": torch.nn.functional.cosine_similarity(a, b, dim=0).item(),
            "logit_max_abs_diff": (a - b).abs().max().item(), "top1_equal": int(a.argmax()) == int(b.argmax())}


def vision_metrics(a: torch.Tensor | None, b: torch.Tensor | None) -> dict:
    if a is None or b is None or a.shape != b.shape:
        return {"vision_rel_err": None, "vision_max_abs_diff": None}
    a, b = a.double(), b.double()
    return {"vision_rel_err": ((a - b).norm() / b.norm().clamp_min(1e-30)).item(),
            "vision_max_abs_diff": (a - b).abs().max().item()}


def summarize(rows: list[dict]) -> dict:
    n = len(rows)
    cos = [r["logit_cosine"] for r in rows]
    vis = [r["vision_rel_err"] for r in rows if r["vision_rel_err"] is not None]
    div = [r["first_divergence"] for r in rows if r["first_divergence"] is not None]
    return {"inputs": n, "identical": sum(r["identical"] for r in rows),
            "identical_frac": sum(r["identical"] for r in rows) / n,
            "mean_agreement": sum(r["agreement"] for r in rows) / n,
            "first_divergence_min": min(div) if div else None,
            "first_divergence_mean": sum(div) / len(div) if div else None,
            "top1_frac": sum(r["top1_equal"] for r in rows) / n,
            "min_logit_cosine": min(cos), "mean_logit_cosine": sum(cos) / n,
            "max_logit_abs_diff": max(r["logit_max_abs_diff"] for r in rows),
            "max_vision_rel_err": max(vis) if vis else None,
            "mean_vision_rel_err": sum(vis) / len(vis) if vis else None,
            "max_vision_abs_diff": max((r["vision_max_abs_diff"] for r in rows
                                        if r["vision_max_abs_diff"] is not None), default=None),
            "prompts_differ": sum(not r["prompt_ids_equal"] for r in rows)}


def parse_bounds(text: str | None, kind: str) -> dict[str, float]:
    out = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in BOUNDS or BOUNDS[name][1] != kind:
            ok = [k for k, (_, d) in BOUNDS.items() if d == kind]
            raise SystemExit(f"--fail-{'under' if kind == 'min' else 'over'}: unknown bound {name!r} (known: {', '.join(ok)})")
        out[name] = float(value)
    return out


def check_bounds(summary: dict, under: dict, over: dict) -> list[str]:
    failed = []
    for name, bound in under.items():
        v = summary[BOUNDS[name][0]]
        if v is None or v < bound:
            failed.append(f"{name} = {v} < {bound}")
    for name, bound in over.items():
        v = summary[BOUNDS[name][0]]
        if v is not None and v > bound:
            failed.append(f"{name} = {v} > {bound}")
    return failed


def run(engine, reference, inputs: list[Input], max_new_tokens: int = 32, ignore_eos: bool = False,
        max_tiles: int | None = None, progress=None) -> list[dict]:
    """engine: the side under test (an Engine); reference: a TransformersReference or another Engine."""
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=ignore_eos)
    reqs = [Request(prompt=x.question, images=[x.image] if x.image else [], params=params, max_tiles=max_tiles)
            for x in inputs]
    stop_ids = [] if ignore_eos else sorted(engine.stop_ids)
    ref_is_engine = hasattr(reference, "generate") and hasattr(reference, "make_sequence")
    rows = []
    batch = engine.runner.max_batch
    for i in range(0, len(reqs), batch):
        part, chunk = reqs[i:i + batch], inputs[i:i + batch]
        t0 = time.perf_counter()
        results = engine.generate(part)
        t_gen = time.perf_counter() - t0
        ref_results = reference.generate(part) if ref_is_engine else None
        for j, (x, req, res) in enumerate(zip(chunk, part, results)):
            ids, pixels, logits, vis = probe(engine, req)
            if ref_is_engine:
                ref_ids, _, ref_logits, ref_vis = probe(reference, req)
                ref_tokens, ref_text = ref_results[j].output_token_ids, ref_results[j].text
            else:
                ref_ids = ids
                ref_tokens, ref_logits = reference.generate(ids, pixels, max_new_tokens, stop_ids)
                ref_vis = reference.vision_embeds(pixels) if pixels is not None else None
                ref_text = engine.tokenizer.decode([t for t in ref_tokens if t not in engine.stop_ids],
                                                   skip_special_tokens=True)
            n = min(logits.shape[0], ref_logits.shape[0])
            row = {"name": x.name, "image": x.image, "question": x.question, "prompt_tokens": len(ids),
                   "prompt_ids_equal": ids == ref_ids, "text": res.text, "ref_text": ref_text,
                   **token_metrics(res.output_token_ids, ref_tokens), **logit_metrics(logits[:n], ref_logits[:n]),
                   **vision_metrics(vis, ref_vis), "seconds": round(t_gen / len(part), 4)}
            rows.append(row)
            if progress is not None:
                progress.update(1)
    return rows


def table(rows: list[dict], summary: dict) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)
    head = f"{'input':28s} {'same':>4s} {'div@':>5s} {'agree':>6s} {'cosine':>10s} {'max|dl|':>9s} {'vis rel':>9s}  output"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name'][:28]:28s} {'yes' if r['identical'] else 'no':>4s} {f(r['first_divergence'], 'd'):>5s} "
                     f"{r['agreement']:6.3f} {r['logit_cosine']:10.7f} {r['logit_max_abs_diff']:9.2e} "
                     f"{f(r['vision_rel_err'], '9.2e'):>9s}  {r['text'][:40]!r}")
    s = summary
    lines.append("-" * len(head))
    lines.append(f"{s['inputs']} inputs: identical greedy outputs {s['identical']}/{s['inputs']}, "
                 f"mean token agreement {s['mean_agreement']:.3f}, first divergence "
                 f"{'none' if s['first_divergence_min'] is None else 'at step ' + str(s['first_divergence_min']) + ' or later'}; "
                 f"first-token logits: cosine min {s['min_logit_cosine']:.7f} mean {s['mean_logit_cosine']:.7f}, "
                 f"max |diff| {s['max_logit_abs_diff']:.3e}, argmax equal {s['top1_frac']:.3f}; "
                 f"vision embeddings: max rel err {f(s['max_vision_rel_err'], '.3e')}")
    if s["prompts_differ"]:
        lines.append(f"note: {s['prompts_differ']} prompts were tokenized differently by the two sides")
    return "\n".join(lines)


def predictions(rows: list[dict], key: str) -> dict:
    """{image file name: text} as the reference README's CLIP judge reads them (first question per image)."""
    out = {}
    for r in rows:
        if r["image"]:
            out.setdefault(Path(r["image"]).name, r[key])
    return out
