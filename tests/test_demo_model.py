"""The shipped demo model (models/internvl-demo): it loads as an original-format checkpoint, matches
its registry entry, and answers held-out synthetic questions correctly through the runtime's engine
(the eager graphs: the same code path as an artifact, uncompiled), and, compiled by `internvl-compile
--model internvl-demo` as `make demo` does, answers the same through the artifact and `internvl-run`.
tools/demo_accuracy.py measures the full 300-question accuracy of the compiled artifact."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "models" / "internvl-demo"
sys.path.insert(0, str(ROOT / "tools"))
from conftest import DEMO_BUCKETS as BUCKETS  # noqa: E402  (demo_artifact: conftest.py)


@pytest.fixture(scope="module")
def demo():
    from internvl_aot.compile.checkpoint import load_checkpoint
    return load_checkpoint(CKPT)


def held_out_answers(engine):
    """20 held-out questions (all 8 kinds), greedy, 4 per generate() call: (question, right answer, answer)."""
    import demo_vqa
    from internvl_aot.runtime.engine import Request
    from internvl_aot.runtime.sampler import SamplingParams

    data = demo_vqa.questions(seed=77, n=20)
    params = SamplingParams(max_new_tokens=8)
    answers = []
    for i in range(0, len(data), 4):
        answers += [r.text.strip() for r in engine.generate(
            [Request(prompt=q, images=[im], params=params) for im, q, _, _ in data[i:i + 4]])]
    return [(q, want, got) for (_, q, want, _), got in zip(data, answers)]


@pytest.fixture(scope="module")
def eager(demo):
    """The runtime's engine on the eager graphs: the checkpoint's weights, uncompiled."""
    from internvl_aot.compile.buckets import Buckets
    from internvl_aot.compile.eager import eager_engine
    cfg, weights = demo
    return eager_engine(cfg, weights, CKPT, Buckets.parse(BUCKETS))


@pytest.fixture(scope="module")
def eager_answers(eager):
    return held_out_answers(eager)


def test_demo_checkpoint_is_original_internlm2_format(demo):
    import json
    c = json.loads((CKPT / "config.json").read_text())
    assert c["architectures"] == ["InternVLChatModel"] and c["llm_config"]["architectures"] == ["InternLM2ForCausalLM"]
    assert c["template"] == "internlm2-chat" and c["ps_version"] == "v2" and c["max_dynamic_patch"] == 1
    from safetensors import safe_open
    with safe_open(str(CKPT / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "language_model.model.layers.0.attention.wqkv.weight" in keys and "language_model.output.weight" in keys
    assert sum(p.stat().st_size for p in CKPT.iterdir()) < 30e6


def test_registry_entry_mirrors_the_checkpoint(demo):
    from internvl_aot.compile.cli import find_checkpoint
    from internvl_aot.compile.registry import registry_config
    cfg, _ = demo
    reg = registry_config("internvl-demo")
    assert reg.vision == cfg.vision and reg.llm == cfg.llm
    assert (reg.template, reg.max_dynamic_patch, reg.image_context_token_id, reg.ps_version, reg.select_layer) == \
        (cfg.template, cfg.max_dynamic_patch, cfg.image_context_token_id, cfg.ps_version, cfg.select_layer)
    assert find_checkpoint("internvl-demo").resolve() == CKPT.resolve()


def test_demo_model_answers_held_out_questions(eager_answers):
    """At least 85% exactly right (17 of 20)."""
    wrong = [a for a in eager_answers if a[1] != a[2]]
    assert len(wrong) <= 3, wrong


def test_compiled_demo_answers_like_the_eager_model(demo_artifact, eager_answers):
    """The artifact: at least 85% right on the same 20 questions, and the eager model's answer on 19 of them."""
    from internvl_aot.runtime.engine import Engine
    answers = held_out_answers(Engine.from_artifact(demo_artifact))
    wrong = [a for a in answers if a[1] != a[2]]
    assert len(wrong) <= 3, wrong
    differ = [(a[0], a[2], b[2]) for a, b in zip(answers, eager_answers) if a[2] != b[2]]
    assert len(differ) <= 1, differ


def test_internvl_run_answers_the_bundled_question(demo_artifact):
    """What `make demo` prints: the answer on the first line, then its timings."""
    import json
    demo = json.loads((CKPT / "demo.json").read_text())
    p = subprocess.run([sys.executable, "-m", "internvl_aot.runtime.cli", "--artifact", str(demo_artifact),
                        "--image", str(CKPT / demo["image"]), "--prompt", demo["question"], "--max-new-tokens", "16"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[0].strip() == demo["answer"], p.stdout
    assert "first token" in p.stdout + p.stderr


def test_bundled_demo_question(eager):
    """The picture and question `make demo` uses, answered right."""
    from internvl_aot.runtime.engine import Request
    import json
    demo = json.loads((CKPT / "demo.json").read_text())
    [r] = eager.generate([Request(prompt=demo["question"], images=[CKPT / demo["image"]])])
    assert r.text.strip() == demo["answer"] and r.finish_reason == "stop"
