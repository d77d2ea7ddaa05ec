"""internvl-eval: precision checks of a compiled artifact (docs/precision.md).

    internvl-eval compare   --artifact DIR --reference CKPT_OR_ARTIFACT --images FOLDER [--questions FILE]
    internvl-eval textvqa   --artifact DIR --data textvqa_val.jsonl [--annotations textvqa_val_annotations.json]
    internvl-eval clipscore --predictions A.json [B.json ...] --images FOLDER --clip CLIP

compare: greedy outputs identical or not, first divergence, first-token logit cosine and max
difference, vision-embedding relative error, per input and overall; JSON + a table; non-zero exit
when a --fail-under / --fail-over bound is crossed. textvqa: VQA accuracy with InternVL's TextVQA
prompt, results.csv + outputs.jsonl, resumable. clipscore: the reference README's open_clip judge
(cosine of CLIP image and text features), from a transformers CLIP directory or open_clip's
open_clip_pytorch_model.bin, without open_clip.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _bar(desc: str, total: int = 0, quiet: bool = False):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="q", file=sys.stderr, disable=quiet, dynamic_ncols=True)


def cmd_compare(args) -> int:
    from . import compare
    from .engines import describe, is_artifact, is_checkpoint, open_engine

    under = compare.parse_bounds(args.fail_under, "min")
    over = compare.parse_bounds(args.fail_over, "max")
    inputs = compare.list_inputs(args.images, args.questions, args.limit)
    engine = open_engine(args.artifact, dtype=args.eager_dtype)
    ref_path = Path(args.reference)
    if is_artifact(ref_path):
        reference = open_engine(ref_path)
        ref_info = describe(reference, ref_path)
    elif is_checkpoint(ref_path):
        from .reference import TransformersReference
        reference = TransformersReference(ref_path, args.reference_dtype, args.reference_device)
        ref_info = reference.info
    else:
        raise SystemExit(f"--reference {ref_path}: neither an artifact nor a checkpoint directory")
    info = describe(engine, args.artifact)
    print(f"compare: {info['path']} ({info['kind']}, {info['dtype']}, TP={info['tp']}) against "
          f"{ref_info['path']} ({ref_info['kind']}, {ref_info['dtype']}); {len(inputs)} inputs, "
          f"{args.max_new_tokens} new tokens", file=sys.stderr)
    with _bar("compare", len(inputs), args.quiet) as bar:
        rows = compare.run(engine, reference, inputs, args.max_new_tokens, args.ignore_eos, args.max_tiles, bar)
    summary = compare.summarize(rows)
    failed = compare.check_bounds(summary, under, over)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"artifact": info, "reference": ref_info, "max_new_tokens": args.max_new_tokens,
              "ignore_eos": args.ignore_eos, "summary": summary, "bounds": {"under": under, "over": over},
              "failed": failed, "inputs": rows}
    (out / "compare.json").write_text(json.dumps(report, indent=1))
    (out / "predictions_artifact.json").write_text(json.dumps(compare.predictions(rows, "text"), indent=1))
    (out / "predictions_reference.json").write_text(json.dumps(compare.predictions(rows, "ref_text"), indent=1))
    print(compare.table(rows, summary))
    print(f"wrote {out / 'compare.json'}, {out / 'predictions_artifact.json'}, {out / 'predictions_reference.json'}")
    if args.json:
        print(json.dumps({"summary": summary, "failed": failed}))
    for close in (getattr(engine, "close", None), getattr(reference, "close", None)):
        if close:
            close()
    if failed:
        print("FAILED: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


def cmd_textvqa(args) -> int:
    from . import textvqa
    from .engines import describe, open_engine

    items = textvqa.load_items(Path(args.data), Path(args.annotations) if args.annotations else None, args.limit)
    engine = open_engine(args.artifact, dtype=args.eager_dtype)
    info = describe(engine, args.artifact)
    settings = {"artifact": str(Path(args.artifact).resolve()), "data": str(Path(args.data).resolve())}
    print(f"textvqa: {len(items)} questions from {args.data}, {info['path']} ({info['kind']}, {info['dtype']}, "
          f"TP={info['tp']})", file=sys.stderr)
    with _bar("textvqa", len(items), args.quiet) as bar:
        summary = textvqa.run(engine, items, Path(args.out), args.prompt, args.max_new_tokens, args.batch,
                              args.restart, bar, settings)
    engine.close()
    for t in summary["subsets"]:
        print(f"{t['subset']:10s} {t['questions']:5d} questions  VQA accuracy {t['accuracy']:6.2f}%  "
              f"exact match {t['exact_match']:6.2f}%")
    print(f"answered {summary['answered_now']} now in {summary['seconds_now']} s; "
          f"wrote {Path(args.out) / 'results.csv'} and {Path(args.out) / 'outputs.jsonl'}")
    if args.json:
        print(json.dumps(summary))
    if args.fail_under is not None and summary["accuracy"] < args.fail_under:
        print(f"FAILED: accuracy {summary['accuracy']}% < {args.fail_under}%", file=sys.stderr)
        return 1
    return 0


def cmd_clipscore(args) -> int:
    from . import clip

    judge = clip.ClipJudge.load(Path(args.clip), tokenizer=args.clip_tokenizer, device=args.device)
    print(f"clipscore: {judge.describe()}", file=sys.stderr)
    preds = {p: clip.read_predictions(Path(p)) for p in args.predictions}
    images = sorted(set().union(*[set(p) for p in preds.values()]))
    scores = {p: {} for p in preds}
    with _bar("clipscore", len(images), args.quiet) as bar:
        for name in images:
            path = Path(args.images) / name
            img_feat = judge.image_features(path)
            for p, texts in preds.items():
                if name in texts:
                    scores[p][name] = judge.score(img_feat, texts[name])
            bar.update(1)
    names = [Path(p).name for p in preds]
    width = max(12, *(len(n) for n in names))
    print(f"{'image':32s} " + " ".join(f"{n:>{width}s}" for n in names))
    for name in images:
        print(f"{name[:32]:32s} " + " ".join(
            f"{scores[p][name]:{width}.4f}" if name in scores[p] else f"{'-':>{width}s}" for p in preds))
    means = {p: sum(s.values()) / len(s) for p, s in scores.items() if s}
    print(f"{'mean':32s} " + " ".join(f"{means.get(p, float('nan')):{width}.4f}" for p in preds))
    report = {"clip": judge.describe(), "mean": means, "per_image": scores}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    if args.json:
        print(json.dumps(report))
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="internvl-eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    sub = ap.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compare", help="an artifact against a reference checkpoint or artifact")
    c.add_argument("--artifact", required=True, help="artifact directory (a checkpoint directory runs its eager graphs)")
    c.add_argument("--reference", required=True, help="checkpoint directory (run by transformers) or artifact")
    c.add_argument("--images", default=None, help="folder of images (every image, each question)")
    c.add_argument("--questions", default=None, help="text file (a question a line) or jsonl with image+question")
    c.add_argument("--max-new-tokens", type=int, default=32)
    c.add_argument("--ignore-eos", action="store_true", help="generate --max-new-tokens on both sides")
    c.add_argument("--max-tiles", type=int, default=None, help="tiles per image (default: the checkpoint's)")
    c.add_argument("--limit", type=int, default=None, help="first N inputs only")
    c.add_argument("--reference-dtype", default="fp32", help="dtype of a transformers reference (default fp32)")
    c.add_argument("--reference-device", default="cpu")
    c.add_argument("--eager-dtype", default="fp32", help="dtype when --artifact is a checkpoint (eager graphs)")
    c.add_argument("--fail-under", default=None, help="e.g. identical=1,cosine=0.9999,agreement=0.9,top1=1")
    c.add_argument("--fail-over", default=None, help="e.g. logit_max_abs=0.05,vision_rel_err=0.01")
    c.add_argument("--out", default="build/eval/compare")
    c.add_argument("--json", action="store_true", help="print the summary as JSON on the last line")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_compare)

    t = sub.add_parser("textvqa", help="TextVQA accuracy of an artifact")
    t.add_argument("--artifact", required=True, help="artifact directory (a checkpoint directory runs its eager graphs)")
    t.add_argument("--data", required=True, help="textvqa_val.jsonl")
    t.add_argument("--annotations", default=None, help="textvqa_val_annotations.json (default: next to --data)")
    t.add_argument("--out", default="build/eval/textvqa", help="results.csv, outputs.jsonl (resumed if present)")
    t.add_argument("--prompt", default=None, help="template with {question} (default: InternVL's TextVQA prompt)")
    t.add_argument("--max-new-tokens", type=int, default=None, help="default 10, as InternVL's evaluation")
    t.add_argument("--batch", type=int, default=None, help="requests per generate() (default: twice the largest batch)")
    t.add_argument("--limit", type=int, default=None)
    t.add_argument("--restart", action="store_true", help="drop the outputs of an earlier run in --out")
    t.add_argument("--eager-dtype", default="fp32", help="dtype when --artifact is a checkpoint (eager graphs)")
    t.add_argument("--fail-under", type=float, default=None, help="exit 1 below this accuracy (percent)")
    t.add_argument("--json", action="store_true")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_textvqa)

    s = sub.add_parser("clipscore", help="CLIP score of prediction files (the reference README's judge)")
    s.add_argument("--predictions", nargs="+", required=True, help="JSON {image file: text} (or compare/textvqa output)")
    s.add_argument("--images", required=True, help="folder the prediction files' image names are in")
    s.add_argument("--clip", required=True, help="transformers CLIP directory, or open_clip_pytorch_model.bin (or its folder)")
    s.add_argument("--clip-tokenizer", default=None, help="CLIP tokenizer directory (default: next to --clip)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--out", default=None, help="write the scores as JSON here")
    s.add_argument("--json", action="store_true")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_clipscore)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "textvqa":
        from .textvqa import MAX_NEW_TOKENS, PROMPT
        args.prompt = args.prompt or PROMPT
        args.max_new_tokens = args.max_new_tokens or MAX_NEW_TOKENS
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
