"""internvl-eval (precision/): the VQA normaliser and accuracy against known cases of the VQA / EvalAI
evaluation code; `textvqa` on the demo set; `compare` of a tiny checkpoint's artifact against
transformers' InternVLForConditionalGeneration on the original weights (fp32: identical; bf16: a
measurable, bounded difference) and against another engine."""
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from internvl_aot.precision import cli
from internvl_aot.precision.vqa_eval import normalize_answer, vqa_accuracy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

# (raw answer, normalised): each rule of the EvalAI answer processor that TextVQA's evaluation uses
NORMALISED = [
    ("Two", "2"), ("ten dollars", "10 dollars"), ("None", "0"),            # number words
    ("the cat", "cat"), ("A dog", "dog"), ("an apple", "apple"),           # articles
    ("dont", "don't"), ("isnt it", "isn't it"), ("Im here", "im here"),    # contractions (after lower case)
    ("hello.", "hello"), ("3.5", "3.5"), ("u.s.a.", "usa"),                # full stops not before a digit
    ("1,000", "1000"), ("yes!", "yes"), ("what?", "what"),                 # commas, ?, ! at an end
    ("black-and-white", "black and white"), ("e - mail", "e mail"),        # punctuation inside / next to spaces
    ("a dog's toy", "dog 's toy"), ("\tCoca Cola\n", "coca cola"), ("(5)", "5"), ("x/y", "x y"),
    ("It's 5 o'clock", "it 's 5 o'clock"), ("STOP", "stop"),
]
# (prediction, 10 human answers, accuracy): min(1, matches among the other nine / 3), averaged
ACCURACY = [
    ("stop", ["stop"] * 10, 1.0),
    ("stop", ["stop"] * 4 + ["go"] * 6, 1.0),
    ("stop", ["stop"] * 3 + ["go"] * 7, 0.9),
    ("stop", ["stop"] * 2 + ["go"] * 8, 0.6),
    ("stop", ["stop"] + ["go"] * 9, 0.3),
    ("halt", ["stop"] * 10, 0.0),
    ("Two", ["2", "2", "two", "2 ", "3", "three", "3", "3", "3", "3"], 1.0),
    ("the Coca-Cola.", ["coca cola", "Coca Cola", "coke", "coke", "coke", "coke", "coke", "pepsi", "pepsi", "pepsi"], 0.6),
]


@pytest.mark.parametrize("raw, want", NORMALISED)
def test_answer_normalisation(raw, want):
    assert normalize_answer(raw) == want


@pytest.mark.parametrize("pred, answers, want", ACCURACY)
def test_vqa_accuracy(pred, answers, want):
    assert vqa_accuracy(pred, answers) == pytest.approx(want)


def test_single_answer_is_exact_match_after_normalisation():
    assert vqa_accuracy("The Moon.", ["moon"]) == 1.0 and vqa_accuracy("sun", ["moon"]) == 0.0


# ---------------------------------------------------------------- textvqa on the demo model

@pytest.fixture(autouse=True)
def _keep_threads():
    """The commands set torch's thread count (--threads); give the other tests theirs back."""
    import torch
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _run(argv, capsys):
    rc = cli.main(argv + ["--json", "--quiet"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    return rc, json.loads(last)


def test_textvqa_on_the_demo_set(tmp_path, capsys):
    """48 questions of the demo's text pictures through its graphs (the engine, uncompiled). The
    demo never saw InternVL's "Answer the question using a single word or phrase." suffix, so it is
    asked the plain question; the annotators' disagreements cap a perfect model a little under 100%."""
    import demo_textvqa
    data = demo_textvqa.write(tmp_path / "data", n=48, seed=2026)
    out = tmp_path / "out"
    argv = ["--threads", "1", "textvqa", "--artifact", str(ROOT / "models" / "internvl-demo"), "--data", str(data),
            "--out", str(out), "--prompt", "{question}", "--batch", "16"]
    rc, s = _run(argv + ["--fail-under", "95"], capsys)
    assert rc == 0
    assert s["questions"] == 48 and s["answered_now"] == 48
    assert s["accuracy"] >= 95.0, s
    per = {t["subset"]: t for t in s["subsets"]}
    assert set(per) == {"all", "word", "number", "ink"} and per["all"]["exact_match"] >= 95.0
    rows = [json.loads(l) for l in (out / "outputs.jsonl").read_text().splitlines()]
    assert len(rows) == 48
    for r in rows:
        assert r["prompt"] == r["question"] and r["e2e_time_s"] > 0 and len(r["answers"]) == 10
        assert r["accuracy"] == pytest.approx(vqa_accuracy(r["output"], r["answers"]))
    with (out / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert table[0]["subset"] == "all" and float(table[0]["accuracy"]) == s["accuracy"]

    # resumable: a run cut short (the last 10 lines lost, one cut mid-line) answers only those
    lines = (out / "outputs.jsonl").read_text().splitlines()
    (out / "outputs.jsonl").write_text("\n".join(lines[:38]) + "\n" + lines[38][:20])
    rc, s2 = _run(argv, capsys)
    assert rc == 0 and s2["answered_now"] == 10 and s2["accuracy"] == s["accuracy"]
    rc, s3 = _run(argv, capsys)
    assert s3["answered_now"] == 0 and s3["accuracy"] == s["accuracy"]
    # another prompt in the same folder is refused rather than mixed in
    with pytest.raises(SystemExit, match="other settings"):
        cli.main(argv[:-4] + ["--batch", "16", "--quiet"])
    # a failing bound
    assert cli.main(argv + ["--fail-under", "99.9", "--quiet"]) == 1


# ---------------------------------------------------------------- compare on a tiny checkpoint

@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("compare_images")
    rng = np.random.RandomState(5)
    for i, (w, h) in enumerate([(700, 400), (448, 448), (300, 640)]):
        Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")).save(d / f"img{i}.png")
    return d


def _compare(argv, capsys, tmp_path, name):
    return _run(["--threads", "1", "compare", *argv, "--out", str(tmp_path / name), "--max-tiles", "2", "--max-new-tokens", "16"], capsys)


def test_compare_fp32_artifact_is_identical_to_transformers(tiny_artifact, tiny_checkpoints, images, tmp_path, capsys):
    ckpt = tiny_checkpoints["llama_vit300m"].original_dirs["internlm2"]
    art = tiny_artifact("internlm2_vit300m")
    rc, r = _compare(["--artifact", str(art), "--reference", str(ckpt), "--images", str(images),
                      "--fail-under", "identical=1,cosine=0.99999,top1=1", "--fail-over", "vision_rel_err=1e-5"],
                     capsys, tmp_path, "fp32")
    s = r["summary"]
    assert rc == 0 and not r["failed"], r
    assert s["inputs"] == 3 and s["identical"] == 3 and s["first_divergence_min"] is None and s["prompts_differ"] == 0
    assert s["min_logit_cosine"] > 0.999999 and s["max_logit_abs_diff"] < 1e-3
    assert s["max_vision_rel_err"] < 1e-5
    report = json.loads((tmp_path / "fp32" / "compare.json").read_text())
    assert len(report["inputs"]) == 3 and all(x["tokens"] == x["ref_tokens"] > 0 for x in report["inputs"])
    preds = json.loads((tmp_path / "fp32" / "predictions_artifact.json").read_text())
    assert set(preds) == {"img0.png", "img1.png", "img2.png"}

    # another engine as the reference: the artifact against itself (both sides tokenize and tile)
    rc, r = _compare(["--artifact", str(art), "--reference", str(art), "--images", str(images)], capsys, tmp_path, "self")
    assert rc == 0 and r["summary"]["identical"] == 3 and r["summary"]["max_logit_abs_diff"] == 0.0
    assert r["summary"]["max_vision_rel_err"] == 0.0


def test_compare_bf16_differs_measurably_and_boundedly(tiny_checkpoints, images, tmp_path, capsys):
    """bf16 (the checkpoint's graphs run by the engine in bf16, uncompiled) against transformers
    fp32: the difference is measurable, bounded, and a bound tighter than it fails the run."""
    ckpt = tiny_checkpoints["llama_vit300m"].original_dirs["internlm2"]
    argv = ["--artifact", str(ckpt), "--eager-dtype", "bf16", "--reference", str(ckpt), "--images", str(images)]
    rc, r = _compare(argv + ["--fail-under", "cosine=0.99", "--fail-over", "vision_rel_err=0.05"], capsys, tmp_path, "bf16")
    s = r["summary"]
    assert rc == 0, r
    assert 0.99 < s["min_logit_cosine"] < 0.999999          # not fp32-identical, still close
    assert 1e-3 < s["max_logit_abs_diff"] < 1.0
    assert 1e-4 < s["max_vision_rel_err"] < 0.05
    rc, r = _compare(argv + ["--fail-over", "logit_max_abs=1e-6"], capsys, tmp_path, "bf16-tight")
    assert rc == 1 and r["failed"] and r["failed"][0].startswith("logit_max_abs")


def test_runtime_never_imports_precision():
    """precision/ is a compile-side tool (transformers); the runtime that ships must not depend on it."""
    import ast
    for path in (ROOT / "runtime").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any("precision" in n for n in names), f"{path} imports {names}"
