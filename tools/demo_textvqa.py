#!/usr/bin/env python3
"""A small TextVQA-format set of the demo model's text pictures (tools/demo_vqa.py: a word in
capitals and a number, one colour), with ten simulated human answers per question.

    .venv/bin/python tools/demo_textvqa.py build/eval/demo-textvqa            # 96 questions, seed 2026
    .venv/bin/python tools/demo_textvqa.py OUT --n 200 --seed 7

Writes OUT/images/<id>.png, OUT/textvqa_val.jsonl (the reference README's format: `image`
relative to the jsonl, `question`, `question_id`, `answer`) and OUT/textvqa_val_annotations.json
(the VQA annotation format: `annotations`, each with `question_id` and ten `answers`). The
questions are the demo's own ("What word is written?", "What number is written?", "What colour
is the text?", in turn), asked about pictures the training never drew (its seeds are 0 and
10000+).

The ten answers imitate TextVQA's annotators: most write the right answer, some in another form
that the VQA normalisation makes equal ("MOON", "the moon.", "Green!"), and now and then one writes
something else (a neighbouring word or number, a misreading), so a perfect model scores a little
under 100% and a prediction matching only some annotators gets partial credit (0.3 / 0.6 / 0.9).
Everything is a function of the seed.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_vqa  # noqa: E402

KINDS = ["word", "number", "ink"]


def _same_answer_forms(answer: str, kind: str) -> list[str]:
    """Ways of writing `answer` that normalise to it."""
    forms = [answer.upper(), answer.capitalize(), f"{answer}.", f" {answer} ", f"the {answer}"]
    if kind == "ink":
        forms += [f"{answer}!", f"a {answer}"]
    return forms


def _other_answer(rng: random.Random, answer: str, kind: str) -> str:
    if kind == "word":
        return rng.choice([w for w in demo_vqa.WORDS if w != answer] + [answer[:-1], answer + "s"])
    if kind == "number":
        return rng.choice([answer[::-1] if answer[0] != answer[1] else str(int(answer) + 1),
                           f"{answer[0]} {answer[1]}", str(int(answer) + rng.choice([-1, 1])),
                           f"no. {answer}"])
    return rng.choice([c for c in demo_vqa.COLOURS if c != answer] + ["black"])


def human_answers(rng: random.Random, answer: str, kind: str, n: int = 10) -> list[str]:
    out = []
    wrong_rate = rng.choice([0.0, 0.0, 0.1, 0.2, 0.5])   # most questions are easy, a few contested
    for _ in range(n):
        r = rng.random()
        if r < wrong_rate:
            out.append(_other_answer(rng, answer, kind))
        elif r < wrong_rate + (1 - wrong_rate) * 0.3:
            out.append(rng.choice(_same_answer_forms(answer, kind)))
        else:
            out.append(answer)
    return out


def write(out: Path, n: int = 96, seed: int = 2026) -> Path:
    """Write the set into `out`; returns the jsonl's path."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows, annotations = [], []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        ex = demo_vqa.example(rng, kind)
        _, question, answer = next(qa for qa in ex.qas if qa[0] == kind)
        qid = 90000 + i
        name = f"images/{qid}.png"
        ex.image.save(out / name, optimize=True)
        rows.append({"image": name, "question": question, "question_id": qid, "answer": answer})
        answers = human_answers(rng, answer, kind)
        annotations.append({"question_id": qid, "image_id": str(qid), "question_type": kind,
                            "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(answers)]})
    jsonl = out / "textvqa_val.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "textvqa_val_annotations.json").write_text(json.dumps(
        {"info": {"description": f"demo TextVQA-format set, tools/demo_textvqa.py, seed {seed}"},
         "annotations": annotations}, indent=1))
    return jsonl


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--seed", type=int, default=2026)
    args = ap.parse_args(argv)
    print(write(Path(args.out), args.n, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
