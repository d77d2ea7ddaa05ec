"""internvl-serve on loopback with the compiled demo model, driven by real clients (openai,
huggingface_hub, tritonclient) and by plain HTTP for MindIE native, vLLM and Triton generate.
Every greedy answer must equal the offline engine's (and `internvl-run`'s) for the same picture
and question; bad input gets a 4xx in the route's own shape, and the server keeps serving."""
import base64
import http.server
import io
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from internvl_aot.bench.serve import free_port, running_server

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
STAR = ROOT / "models" / "internvl-demo" / "demo.png"
STAR_Q = "What colour is the star?"
MAX_NEW = 8


def _b64(path_or_image) -> str:
    if isinstance(path_or_image, Path):
        return base64.b64encode(path_or_image.read_bytes()).decode()
    buf = io.BytesIO()
    path_or_image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    (d / "allowed").mkdir()
    (d / "allowed" / "star.png").write_bytes(STAR.read_bytes())
    (d / "secret.png").write_bytes(STAR.read_bytes())
    os.symlink(d / "secret.png", d / "allowed" / "link.png")
    return d


@pytest.fixture(scope="module")
def image_host():
    """A loopback HTTP server with the demo picture at /star.png and a redirect to another host."""
    data = STAR.read_bytes()
    port = free_port()

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/star.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            elif self.path == "/away":
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{port}/star.png")
                self.end_headers()
            else:
                self.send_response(404)
                self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{port}"
    srv.shutdown()


@pytest.fixture(scope="module")
def server(demo_artifact, media_dir, image_host):
    with open(media_dir / "server.log", "w") as log, running_server(
            demo_artifact, "--served-model-name", "internvl-demo",
            "--allowed-local-media-path", str(media_dir / "allowed"), "--allowed-media-domains", "127.0.0.1",
            "--max-body-mb", "2", "--max-image-pixels", "4000000", "--max-images", "3",
            "--max-new-tokens-cap", "64", "--threads", "1", log=log) as (_, base):
        yield base


@pytest.fixture(scope="module")
def offline(demo_artifact):
    """Greedy answers of the offline engine on the same artifact: question/picture -> text."""
    from internvl_aot.runtime.engine import Engine, Request
    from internvl_aot.runtime.sampler import SamplingParams
    engine = Engine.from_artifact(demo_artifact)

    def answer(prompt, images=()):
        return engine.generate([Request(prompt=prompt, images=list(images),
                                        params=SamplingParams(max_new_tokens=MAX_NEW))])[0].text
    return answer


@pytest.fixture(scope="module")
def cli_answer(demo_artifact):
    p = subprocess.run([sys.executable, "-m", "internvl_aot.runtime.cli", "--artifact", str(demo_artifact),
                        "--image", str(STAR), "--prompt", STAR_Q, "--max-new-tokens", str(MAX_NEW), "--json"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])["text"]


def parts(text, image_b64):
    return [{"type": "text", "text": text}, {"type": "image_url", "image_url": "data:image/png;base64," + image_b64}]


# ------------------------------------------------------------------------- real clients
def test_openai_client_chat_stream_and_models(server, cli_answer):
    import openai
    client = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)
    assert cli_answer.strip() == "yellow"
    msgs = [{"role": "user", "content": [
        {"type": "text", "text": STAR_Q},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _b64(STAR)}}]}]
    r = client.chat.completions.create(model="anything", messages=msgs, max_tokens=MAX_NEW, temperature=0)
    assert r.choices[0].message.content == cli_answer
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 256 and r.model == "anything"
    stream = client.chat.completions.create(model="x", messages=msgs, max_completion_tokens=MAX_NEW, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == cli_answer
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == r.usage.total_tokens
    assert [m.id for m in client.models.list()] == ["internvl-demo"]
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="x", messages=msgs, temperature=5)
    # fields that ask for nothing are accepted, the same fields asking for something are refused
    r = client.chat.completions.create(model="x", messages=msgs, max_tokens=MAX_NEW, temperature=0,
                                       response_format={"type": "text"}, tools=[], logit_bias={})
    assert r.choices[0].message.content == cli_answer
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model="x", messages=msgs, response_format={"type": "json_object"})


def test_huggingface_hub_client_tgi_and_chat(server, cli_answer):
    from huggingface_hub import InferenceClient
    client = InferenceClient(base_url=server)
    prompt = f"![](data:image/png;base64,{_b64(STAR)}){STAR_Q}"
    assert client.text_generation(prompt, max_new_tokens=MAX_NEW) == cli_answer
    out = client.text_generation(prompt, max_new_tokens=MAX_NEW, details=True)
    assert out.generated_text == cli_answer and out.details.finish_reason in ("eos_token", "length")
    assert "".join(client.text_generation(prompt, max_new_tokens=MAX_NEW, stream=True)) == cli_answer
    last = list(client.text_generation(prompt, max_new_tokens=MAX_NEW, stream=True, details=True))[-1]
    assert last.generated_text == cli_answer and isinstance(last.token.id, int)
    chat = InferenceClient(base_url=server + "/v1").chat_completion(
        messages=[{"role": "user", "content": [{"type": "text", "text": STAR_Q}, {
            "type": "image_url", "image_url": {"url": "data:image/png;base64," + _b64(STAR)}}]}],
        max_tokens=MAX_NEW, temperature=0)
    assert chat.choices[0].message.content == cli_answer


def test_tritonclient_health(server):
    import tritonclient.http as tc
    client = tc.InferenceServerClient(url=server.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("internvl-demo")
    assert client.get_model_metadata("internvl-demo")["name"] == "internvl-demo"


# ------------------------------------------------------------------------- plain HTTP formats
def test_mindie_vllm_triton_over_plain_http(server, cli_answer):
    img = _b64(STAR)
    with httpx.Client(base_url=server, timeout=60) as c:
        r = c.post("/infer", json={"inputs": parts(STAR_Q, img), "stream": False,
                                   "parameters": {"max_new_tokens": MAX_NEW, "details": True}})
        assert r.status_code == 200 and r.json()["generated_text"] == cli_answer
        assert r.json()["details"]["generated_tokens"] >= 1
        events = []
        with c.stream("POST", "/infer", json={"inputs": parts(STAR_Q, img), "stream": True,
                                              "parameters": {"max_new_tokens": MAX_NEW}}) as s:
            for line in s.iter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
        assert events[-1]["generated_text"] == cli_answer and isinstance(events[0]["token"]["id"], list)
        assert "".join(e["token"]["text"] or "" for e in events) == cli_answer

        r = c.post("/generate", json={"prompt": parts(STAR_Q, img), "max_tokens": MAX_NEW, "temperature": 0})
        assert r.status_code == 200 and r.json()["text"] == [STAR_Q + cli_answer]
        with c.stream("POST", "/generate", json={"prompt": parts(STAR_Q, img), "max_tokens": MAX_NEW,
                                                 "temperature": 0, "stream": True}) as s:
            raw = b"".join(s.iter_bytes())
        records = [json.loads(x) for x in raw.split(b"\0") if x]
        assert "".join(rec["text"][0] for rec in records) == cli_answer

        r = c.post("/v2/models/internvl-demo/generate",
                   json={"text_input": parts(STAR_Q, img), "max_tokens": MAX_NEW, "temperature": 0, "id": "a1"})
        assert r.status_code == 200 and r.json()["text_output"] == cli_answer and r.json()["id"] == "a1"
        r = c.post("/v2/models/internvl-demo/generate",
                   json={"text_input": parts(STAR_Q, img), "parameters": {"max_new_tokens": MAX_NEW}})
        assert r.json()["text_output"] == cli_answer
        with c.stream("POST", "/v2/models/internvl-demo/generate_stream",
                      json={"text_input": parts(STAR_Q, img), "parameters": {"max_new_tokens": MAX_NEW}}) as s:
            outs = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]
        assert "".join(o["text_output"] for o in outs) == cli_answer

        r = c.post("/v1/tokenizer", json={"inputs": "hello world"})
        assert r.status_code == 200 and r.json()["token_number"] == len(r.json()["tokens"]) > 0
        info = c.get("/info").json()
        assert info["max_total_tokens"] == 1024 and info["model_id"] == "internvl-demo"
        assert c.get("/health").status_code == 200 and c.get("/v2/health/live").status_code == 200


def test_images_from_allowed_folder_and_host(server, cli_answer, image_host):
    with httpx.Client(base_url=server, timeout=60) as c:
        for ref in ("star.png", "file://star.png", image_host + "/star.png"):
            r = c.post("/infer", json={"inputs": [{"type": "text", "text": STAR_Q},
                                                  {"type": "image_url", "image_url": {"url": ref}}],
                                       "parameters": {"max_new_tokens": MAX_NEW}})
            assert r.status_code == 200, (ref, r.text)
            assert r.json()["generated_text"] == cli_answer


def test_stop_sequence_cuts_the_text(server, cli_answer):
    img = _b64(STAR)
    stop = cli_answer.strip()[1:3]
    r = httpx.post(server + "/generate", json={"inputs": parts(STAR_Q, img), "parameters": {
        "max_new_tokens": MAX_NEW, "stop": [stop], "details": True}}, timeout=60)
    assert r.json()["generated_text"] == cli_answer[:cli_answer.index(stop)]
    assert r.json()["details"]["finish_reason"] == "stop_sequence"


# ------------------------------------------------------------------------- load
def test_64_concurrent_clients_all_formats(server, offline):
    import demo_vqa
    data = demo_vqa.questions(seed=5, n=16)
    cases = [(im, q, _b64(im)) for im, q, _, _ in data]
    expected = [offline(q, [im]) for im, q, _ in cases]

    def one(i):
        im, q, b = cases[i % len(cases)]
        kind, stream = i % 5, (i // 5) % 2 == 1
        with httpx.Client(base_url=server, timeout=120) as c:
            if kind == 0:
                body = {"model": "m", "max_tokens": MAX_NEW, "temperature": 0, "stream": stream, "messages": [
                    {"role": "user", "content": [{"type": "text", "text": q},
                                                 {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b}}]}]}
                if not stream:
                    return c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
                with c.stream("POST", "/v1/chat/completions", json=body) as s:
                    ev = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: {")]
                return "".join(e["choices"][0]["delta"].get("content", "") for e in ev if e["choices"])
            if kind == 1:
                path = "/generate_stream" if stream else "/generate"
                body = {"inputs": parts(q, b), "parameters": {"max_new_tokens": MAX_NEW}}
                if not stream:
                    return c.post(path, json=body).json()["generated_text"]
                with c.stream("POST", path, json=body) as s:
                    ev = [json.loads(x[5:]) for x in s.iter_lines() if x.startswith("data:")]
                return ev[-1]["generated_text"]
            if kind == 2:
                body = {"prompt": parts(q, b), "max_tokens": MAX_NEW, "temperature": 0, "stream": stream}
                if not stream:
                    return c.post("/generate", json=body).json()["text"][0][len(q):]
                with c.stream("POST", "/generate", json=body) as s:
                    raw = b"".join(s.iter_bytes())
                return "".join(json.loads(x)["text"][0] for x in raw.split(b"\0") if x)
            if kind == 3:
                path = "/v2/models/m/generate" + ("_stream" if stream else "")
                body = {"text_input": parts(q, b), "parameters": {"max_new_tokens": MAX_NEW}}
                if not stream:
                    return c.post(path, json=body).json()["text_output"]
                with c.stream("POST", path, json=body) as s:
                    return "".join(json.loads(x[5:])["text_output"] for x in s.iter_lines() if x.startswith("data:"))
            body = {"inputs": parts(q, b), "stream": stream, "parameters": {"max_new_tokens": MAX_NEW}}
            if not stream:
                return c.post("/infer", json=body).json()["generated_text"]
            with c.stream("POST", "/infer", json=body) as s:
                ev = [json.loads(x[5:]) for x in s.iter_lines() if x.startswith("data:")]
            return ev[-1]["generated_text"]

    t0 = time.time()
    with ThreadPoolExecutor(64) as pool:
        got = list(pool.map(one, range(64)))
    assert time.time() - t0 < 120
    wrong = [(i, got[i], expected[i % len(cases)]) for i in range(64) if got[i] != expected[i % len(cases)]]
    assert not wrong, wrong[:5]
    metrics = httpx.get(server + "/metrics").text
    assert 'internvl_sequences_finished_total{reason="stop"}' in metrics or "reason=\"length\"" in metrics
    assert "internvl_time_to_first_token_seconds_count" in metrics


def test_disconnected_stream_frees_its_blocks(server):
    img = _b64(STAR)
    body = {"model": "m", "stream": True, "max_tokens": 60, "ignore_eos": True, "temperature": 0,
            "messages": [{"role": "user", "content": parts("Tell me everything about this picture.", img)}]}
    with httpx.Client(base_url=server, timeout=60) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as s:
            for line in s.iter_lines():
                if line.startswith("data:"):
                    break
        deadline = time.time() + 20
        while time.time() < deadline:
            m = c.get("/metrics").text
            used = [ln for ln in m.splitlines() if ln.startswith("internvl_kv_blocks_used ")]
            if used and float(used[0].split()[1]) == 0:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the KV blocks of a disconnected stream were not freed: " + used[0])
        assert 'reason="cancelled"' in c.get("/metrics").text


# ------------------------------------------------------------------------- bad input
def _big_png(w, h) -> str:
    from PIL import Image
    return _b64(Image.new("RGB", (w, h), "white"))


BAD = [
    # (method, path, body (bytes or JSON), expected status, text expected in the error)
    ("POST", "/v1/chat/completions", b"{not json", 400, "malformed JSON"),
    ("POST", "/v1/chat/completions", {"model": "m", "messages": "hi"}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 0}, 400, ">= 1"),
    ("POST", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 100000}, 400, "<= 64"),
    ("POST", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                      "top_p": 0}, 400, "top_p"),
    ("POST", "/v1/completions", {"model": "m", "prompt": ""}, 400, "prompt"),
    ("POST", "/generate", {"inputs": "", "parameters": {}}, 422, "cannot be empty"),
    ("POST", "/generate", {"inputs": "hi", "parameters": {"temperature": 0}}, 422, "temperature"),
    ("POST", "/generate", {"inputs": "hi", "parameters": {"top_p": 1.0}}, 422, "top_p"),
    ("POST", "/generate", {"inputs": "hi", "parameters": {"max_new_tokens": -1}}, 422, ">= 1"),
    ("POST", "/generate", {"inputs": "hi", "parameters": {"bogus": 1}}, 422, "bogus"),
    ("POST", "/generate", {"inputs": "hi", "parameters": {"max_new_tokens": "ten"}}, 422, "integer"),
    ("POST", "/generate_stream", {"inputs": "hi", "parameters": {"decoder_input_details": True}}, 422, "stream"),
    ("POST", "/generate", {"prompt": "hi", "max_tokens": 4, "wat": 1}, 422, "wat"),
    ("POST", "/generate", {"prompt": "hi", "temperature": -1}, 422, "temperature"),
    ("POST", "/generate", {"neither": 1}, 422, "inputs"),
    ("POST", "/infer", {"inputs": [{"type": "image_url", "image_url": None}]}, 422, "image_url"),
    ("POST", "/infer", {"inputs": [{"type": "video_url", "video_url": "x.mp4"}]}, 422, "video_url"),
    ("POST", "/infer", {"inputs": [{"type": "text", "text": "hi"},
                                   {"type": "image_url", "image_url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUg"}]},
     422, "image 1"),
    ("POST", "/infer", {"inputs": [{"type": "text", "text": "hi"},
                                   {"type": "image_url", "image_url": "data:image/png;base64,@@@"}]}, 422, "base64"),
    ("POST", "/infer", {"inputs": [{"type": "text", "text": "hi"},
                                   {"type": "image_url", "image_url": "data:image/png;base64," + "QUJD" * 40}]},
     422, "not a readable image"),
    ("POST", "/infer", {"inputs": [{"type": "text", "text": "hi"},
                                   {"type": "image_url", "image_url": "../secret.png"}]}, 422, "outside"),
    ("POST", "/infer", {"inputs": [{"type": "text", "text": "hi"},
                                   {"type": "image_url", "image_url": "link.png"}]}, 422, "outside"),
    ("POST", "/infer", {"inputs": [{"type": "text", "text": "hi"},
                                   {"type": "image_url", "image_url": "http://example.invalid/a.png"}]},
     422, "not allowed"),
    ("POST", "/infer", {"inputs": [{"type": "text", "text": "hi"}] + [
        {"type": "image_url", "image_url": "star.png"}] * 4}, 422, "at most 3"),
    ("POST", "/infer", {"inputs": "hi " * 2000, "parameters": {"max_new_tokens": 4}}, 422, "context bucket"),
    ("POST", "/infer", {"inputs": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url":
                                                                    "data:image/png;base64," + _big_png(2100, 2000)}]},
     422, "pixels"),
    ("POST", "/v2/models/m/generate", {"text_input": "hi", "parameters": {"max_new_tokens": 0}}, 400, ">= 1"),
    ("POST", "/v2/models/m/generate", {"text_input": "hi", "junk": True}, 400, "junk"),
    ("POST", "/v1/tokenizer", {"inputs": ""}, 422, "inputs"),
    ("POST", "/infer", b"x" * (3 << 20), 413, "limit"),
]


def test_bad_input_gets_4xx_and_the_server_keeps_serving(server, image_host, cli_answer):
    BAD.append(("POST", "/infer", {"inputs": [{"type": "text", "text": "hi"},
                                              {"type": "image_url", "image_url": image_host + "/away"}]},
                422, "redirect"))
    img = _b64(STAR)
    with httpx.Client(base_url=server, timeout=60) as c:
        for method, path, body, status, text in BAD:
            kw = {"content": body} if isinstance(body, bytes) else {"json": body}
            r = c.request(method, path, **kw)
            assert r.status_code == status, (path, body if not isinstance(body, bytes) else body[:40], r.text)
            assert r.headers["content-type"].startswith("application/json")
            assert text in r.text, (path, r.text)
            if path.startswith("/v1/chat") or path.startswith("/v1/completions"):
                assert set(r.json()["error"]) >= {"message", "type"}
            elif path.startswith("/v2"):
                assert set(r.json()) == {"error"}
            else:
                assert set(r.json()) == {"error", "error_type"}
            ok = c.post("/infer", json={"inputs": parts(STAR_Q, img), "parameters": {"max_new_tokens": MAX_NEW}})
            assert ok.status_code == 200 and ok.json()["generated_text"] == cli_answer


def test_openai_completions_raw_prompt(server, offline):
    import openai
    client = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)
    r = client.completions.create(model="m", prompt="Hello", max_tokens=6, temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens >= 1
    text = "".join(c.choices[0].text for c in client.completions.create(model="m", prompt="Hello", max_tokens=6,
                                                                          temperature=0, stream=True))
    assert text == r.choices[0].text


def test_small_kv_pool_queues_requests_without_errors(demo_artifact, offline, tmp_path):
    """A pool that holds about three of these sequences at once: eight concurrent requests wait for
    blocks (recompute preemption itself is tested on the engine, tests/test_engine.py), none fails,
    and every answer equals the offline one."""
    import demo_vqa
    with running_server(demo_artifact, "--kv-cache-gb", "0.0052", "--threads", "1") as (_, base):
        data = demo_vqa.questions(seed=9, n=8)
        want = [offline(q, [im]) for im, q, _, _ in data]

        def one(i):
            im, q, _, _ = data[i]
            body = {"model": "m", "temperature": 0, "max_tokens": MAX_NEW,
                    "messages": [{"role": "user", "content": parts(q, _b64(im))}]}
            r = httpx.post(base + "/v1/chat/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(one, range(8)))
        assert got == want
        m = httpx.get(base + "/metrics").text
        free = [ln for ln in m.splitlines() if ln.startswith("internvl_kv_blocks_free ")][0]
        assert float(free.split()[1]) < 40          # the pool really was small


def test_a_failing_step_is_a_500_for_its_request_only(demo_artifact):
    """In-process: the decode graph raises once; that request gets a 500 in its route's shape with
    x-should-retry: false, and the next request is answered."""
    from fastapi.testclient import TestClient
    from internvl_aot.runtime.engine import Engine
    from internvl_aot.runtime.server.app import ServerOptions, create_app
    engine = Engine.from_artifact(demo_artifact, prefill_chunks_per_decode=1)
    real = engine.runner.decode
    calls = {"n": 0}

    def flaky(seqs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected decode failure")
        return real(seqs)

    engine.runner.decode = flaky
    body = {"model": "m", "temperature": 0, "max_tokens": MAX_NEW, "ignore_eos": True,
            "messages": [{"role": "user", "content": parts(STAR_Q, _b64(STAR))}]}
    with TestClient(create_app(engine, ServerOptions())) as client:
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 500 and r.headers["x-should-retry"] == "false"
        assert "injected decode failure" in r.json()["error"]["message"]
        r = client.post("/generate", json={"inputs": parts(STAR_Q, _b64(STAR)), "parameters": {"max_new_tokens": 4}})
        assert r.status_code == 200 and r.json()["generated_text"]
        assert engine.allocator.num_free_blocks == engine.allocator.num_blocks - 1
