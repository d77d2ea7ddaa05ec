"""`internvl-eval textvqa`: TextVQA accuracy of an artifact, the way the original harness records it.

Data (the reference README's format): a jsonl with `image` (absolute, or relative to the jsonl),
`question`, `question_id`, `answer`; the human answers from `textvqa_val_annotations.json` (VQA
annotation format, looked for next to the jsonl unless given), else a line's own `answers` list,
else its single `answer` (then exact match after normalisation).

Each question is asked as InternVL's TextVQA evaluation asks it: the image, then
"{question} Answer the question using a single word or phrase.", greedy, 10 new tokens at most.
Requests go to `Engine.generate` `--batch` at a time, so they share the engine's continuous
batching. Per item, `outputs.jsonl` gets the output, the prompt, the end-to-end time (arrival
to last token, inside its batch) and the accuracy, one line as each batch ends; a second run
with the same output folder skips the question ids already there (resumable). `results.csv`
has the accuracy overall and per question type.
"""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

from ..runtime.engine import Request
from ..runtime.sampler import SamplingParams
from .vqa_eval import normalize_answer, vqa_accuracy

PROMPT = "{question} Answer the question using a single word or phrase."
MAX_NEW_TOKENS = 10


def load_items(jsonl: Path, annotations: Path | None = None, limit: int | None = None) -> list[dict]:
    jsonl = Path(jsonl)
    if annotations is None and (jsonl.parent / "textvqa_val_annotations.json").is_file():
        annotations = jsonl.parent / "textvqa_val_annotations.json"
    human, qtype = {}, {}
    if annotations is not None:
        for a in json.loads(Path(annotations).read_text())["annotations"]:
            human[a["question_id"]] = [x["answer"] for x in a["answers"]]
            qtype[a["question_id"]] = a.get("question_type") or a.get("answer_type") or ""
    items = []
    for n, line in enumerate(jsonl.read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        image = Path(row["image"])
        if not image.is_absolute():
            image = jsonl.parent / image
        qid = row["question_id"]
        if qid in human:
            answers = human[qid]
        elif isinstance(row.get("answers"), list):
            answers = list(row["answers"])
        elif "answer" in row:
            answers = [row["answer"]]
        else:
            raise SystemExit(f"{jsonl}:{n + 1}: question {qid} has no answers (no annotations, no 'answer')")
        items.append({"question_id": qid, "image": str(image), "question": row["question"],
                      "answers": answers, "answer": row.get("answer", answers[0]), "question_type": qtype.get(qid, row.get("question_type", ""))})
        if limit and len(items) >= limit:
            break
    if not items:
        raise SystemExit(f"{jsonl}: no questions")
    missing = [it["image"] for it in items if not Path(it["image"]).is_file()]
    if missing:
        raise SystemExit(f"{len(missing)} images not found, e.g. {missing[0]}")
    return items


def _done(outputs: Path, settings: dict) -> dict:
    """question_id -> the line of a previous run with the same settings."""
    meta = outputs.parent / "run.json"
    if not outputs.is_file():
        return {}
    if meta.is_file():
        before = json.loads(meta.read_text())
        differ = [k for k in settings if before.get(k) != settings[k]]
        if differ:
            raise SystemExit(f"{outputs.parent} holds a run with other settings ({', '.join(differ)}): "
                             f"use another --out, or --restart")
    out, good = {}, []
    for line in outputs.read_text().splitlines():
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:       # a line cut short when the last run was killed
                continue
            out[row["question_id"]] = row
            good.append(line)
    outputs.write_text("".join(line + "\n" for line in good))      # without the cut line
    return out


def run(engine, items: list[dict], out: Path, prompt: str = PROMPT, max_new_tokens: int = MAX_NEW_TOKENS,
        batch: int | None = None, restart: bool = False, progress=None, settings: dict | None = None) -> dict:
    """Answer every item (skipping those already in out/outputs.jsonl), write results.csv; -> summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    outputs = out / "outputs.jsonl"
    settings = dict(settings or {}, prompt=prompt, max_new_tokens=max_new_tokens)
    if restart and outputs.exists():
        outputs.unlink()
    done = _done(outputs, settings)
    (out / "run.json").write_text(json.dumps(settings, indent=1))
    todo = [it for it in items if it["question_id"] not in done]
    batch = batch or 2 * engine.runner.max_batch
    params = SamplingParams(max_new_tokens=max_new_tokens)
    t0 = time.perf_counter()
    if progress is not None:
        progress.total, progress.n = len(items), len(items) - len(todo)
        progress.refresh()
    with outputs.open("a") as f:
        for i in range(0, len(todo), batch):
            part = todo[i:i + batch]
            reqs = [Request(prompt=prompt.format(question=it["question"]), images=[it["image"]], params=params)
                    for it in part]
            for it, req, res in zip(part, reqs, engine.generate(reqs)):
                pred = res.text.strip()
                row = {"question_id": it["question_id"], "question": it["question"], "image": it["image"],
                       "output": pred, "prompt": req.prompt, "prompt_tokens": len(res.prompt_token_ids),
                       "e2e_time_s": res.timings["total_s"], "ttft_s": res.timings["ttft_s"],
                       "answers": it["answers"], "answer": it["answer"], "normalized": normalize_answer(pred),
                       "accuracy": vqa_accuracy(pred, it["answers"]), "question_type": it["question_type"]}
                done[it["question_id"]] = row
                f.write(json.dumps(row) + "\n")
            f.flush()
            if progress is not None:
                progress.update(len(part))
    seconds = time.perf_counter() - t0
    rows = [done[it["question_id"]] for it in items]
    return write_results(out, rows, settings, seconds, len(todo))


def write_results(out: Path, rows: list[dict], settings: dict, seconds: float, answered: int) -> dict:
    groups = {"all": rows}
    for r in rows:
        if r.get("question_type"):
            groups.setdefault(r["question_type"], []).append(r)
    table = []
    for name, rs in groups.items():
        table.append({"subset": name, "questions": len(rs),
                      "accuracy": round(100 * sum(r["accuracy"] for r in rs) / len(rs), 2),
                      "exact_match": round(100 * sum(r["normalized"] == normalize_answer(r["answer"])
                                                     for r in rs) / len(rs), 2)})
    common = {"artifact": settings.get("artifact", ""), "dataset": settings.get("data", ""),
              "prompt": settings["prompt"], "max_new_tokens": settings["max_new_tokens"],
              "answered_now": answered, "seconds_now": round(seconds, 1),
              "mean_e2e_s": round(sum(r["e2e_time_s"] for r in rows) / max(1, len(rows)), 4)}
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]) + list(common))
        w.writeheader()
        for t in table:
            w.writerow({**t, **common})
    summary = {"accuracy": table[0]["accuracy"], "questions": len(rows), "subsets": table, **common}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
