# Every target uses the venv at .venv (created by `make setup`, which the others depend on).
PY      := .venv/bin/python
MODEL   ?= internvl-demo
WEIGHTS ?=
TP      ?= 1
BACKEND ?= $(shell [ -x $(PY) ] && $(PY) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo cpu)
DTYPE   ?= bf16
BUCKETS ?=
TARGET  ?= native
QUANT   ?= none
KERNELS ?= auto
OUT     ?= artifacts/$(notdir $(MODEL))-tp$(TP)-$(BACKEND)-$(DTYPE)$(if $(filter-out none,$(QUANT)),-$(QUANT))$(if $(filter-out native,$(TARGET)),-$(TARGET))
TORCH   ?= torch==2.13.0

.PHONY: setup compile run demo test bench bench-serve serve eval clean check-runtime-venv check-onnx-runtime-venv

setup: .venv/.installed

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"           # first: the CPU wheel, before anything can pull a CUDA build
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# BACKEND=npu: SOC=Ascend910B3|Ascend910_9392|... (atc --soc_version; Atlas A2/A3); torch_npu's autoload is off for it
# (TORCH_DEVICE_BACKEND_AUTOLOAD=0: with torch_npu installed but no CANN, `import torch` would fail).
SOC     ?=
# BACKEND=onnx: the ONNX opset (18; 15 for Ascend's ATC, which reads opsets 11-15)
OPSET   ?= 18
compile: setup
	$(if $(filter npu,$(BACKEND)),TORCH_DEVICE_BACKEND_AUTOLOAD=0) .venv/bin/internvl-compile --model $(MODEL) \
		$(if $(WEIGHTS),--weights $(WEIGHTS)) --tp $(TP) \
		--backend $(BACKEND) --dtype $(DTYPE) --out $(OUT) $(if $(BUCKETS),--buckets "$(BUCKETS)") \
		--target $(TARGET) $(if $(SOC),--soc $(SOC)) $(if $(filter onnx,$(BACKEND)),--opset $(OPSET)) $(if $(filter-out none,$(QUANT)),--quant $(QUANT)) \
		$(if $(filter-out auto,$(KERNELS)),--kernels $(KERNELS))

# The main job on a fresh machine: compile the demo model that ships in the repository
# (models/internvl-demo: a small trained InternVL2-architecture checkpoint in the original
# OpenGVLab format, InternLM2 backbone; tools/train_demo_model.py) for the CPU, and ask it
# about a bundled picture. fp32: faster than bf16 for this tiny model on the CPU (README).
DEMO_ART      := artifacts/internvl-demo-tp1-cpu-fp32
DEMO_BUCKETS  := vision=1;prefill=512;batch=1,8;context=1024;block_size=32
DEMO_IMAGE    := models/internvl-demo/demo.png
DEMO_QUESTION := What colour is the star?
demo: setup
	.venv/bin/internvl-compile --model internvl-demo --dtype fp32 --backend cpu --out $(DEMO_ART) \
		--buckets "$(DEMO_BUCKETS)"
	.venv/bin/internvl-run --artifact $(DEMO_ART) --image $(DEMO_IMAGE) --prompt "$(DEMO_QUESTION)" \
		--max-new-tokens 16

test: setup
	.venv/bin/pytest -q tests

# Precision check on the demo model (docs/precision.md): a TextVQA-format set of its own kind of
# pictures (rendered words and numbers, tools/demo_textvqa.py, seed 2026) scored on the demo artifact
# (compiled first if missing), then the artifact against transformers on the checkpoint's weights.
# The demo was never taught InternVL's "Answer the question using a single word or phrase." suffix,
# so it is asked the plain question (--prompt "{question}").
EVAL_OUT ?= build/eval/internvl-demo
# One thread: this tiny model gains little from two, and on a busy machine two OpenMP threads
# were 11x slower (103 s against 9 s for the 96 questions, load average 6).
EVAL_THREADS ?= 1
eval: setup
	test -f $(DEMO_ART)/manifest.json || .venv/bin/internvl-compile --model internvl-demo --dtype fp32 --backend cpu \
		--out $(DEMO_ART) --buckets "$(DEMO_BUCKETS)"
	$(PY) tools/demo_textvqa.py $(EVAL_OUT)/data --n 96 --seed 2026
	.venv/bin/internvl-eval --threads $(EVAL_THREADS) textvqa --artifact $(DEMO_ART) --data $(EVAL_OUT)/data/textvqa_val.jsonl \
		--out $(EVAL_OUT)/textvqa --prompt "{question}" --restart --fail-under 95
	.venv/bin/internvl-eval --threads $(EVAL_THREADS) compare --artifact $(DEMO_ART) --reference models/internvl-demo \
		--questions $(EVAL_OUT)/data/textvqa_val.jsonl --limit 24 --max-new-tokens 8 --out $(EVAL_OUT)/compare \
		--fail-under identical=1,top1=1 --fail-over vision_rel_err=1e-4

# The original system's performance sweep (one image, batch 1..10, 256 tokens, EOS ignored)
# against transformers, on the artifact OUT (compiled first if it is not there yet):
#   make bench MODEL=internvl2-2b WEIGHTS=random
#   make bench MODEL=internvl2-2b WEIGHTS=random BATCH_SIZES=1,8 OUTPUT_TOKENS=32 COMPARE=transformers HF_DTYPE=bf16,fp32
# Writes $(BENCH_OUT)/benchmark.csv and benchmark.json; column meanings: docs/performance.md.
COMPARE       ?= transformers
BATCH_SIZES   ?= 1-10
OUTPUT_TOKENS ?= 256
HF_DTYPE      ?=
BENCH_ARGS    ?=
BENCH_OUT     ?= build/bench/$(notdir $(OUT))
bench: setup
	test -f $(OUT)/manifest.json || $(MAKE) compile MODEL=$(MODEL) WEIGHTS=$(WEIGHTS) TP=$(TP) BACKEND=$(BACKEND) \
		DTYPE=$(DTYPE) OUT=$(OUT) $(if $(BUCKETS),BUCKETS="$(BUCKETS)")
	.venv/bin/internvl-bench --artifact $(OUT) --batch-sizes $(BATCH_SIZES) --output-tokens $(OUTPUT_TOKENS) \
		$(if $(COMPARE),--compare $(COMPARE)) $(if $(HF_DTYPE),--hf-dtype $(HF_DTYPE)) --out $(BENCH_OUT) $(BENCH_ARGS)

# HTTP server (MindIE native, TGI, Triton, vLLM and OpenAI formats) on an artifact:
#   make serve ARTIFACT=artifacts/internvl-demo-tp1-cpu-fp32 PORT=8000
ARTIFACT   ?= $(DEMO_ART)
HOST       ?= 127.0.0.1
PORT       ?= 8000
SERVE_ARGS ?=
serve: setup
	.venv/bin/internvl-serve --artifact $(ARTIFACT) --host $(HOST) --port $(PORT) $(SERVE_ARGS)

# The server under load (N streaming clients, the stall of a 7-tile prompt, RSS): bench/serve.py
CLIENTS  ?= 8
DURATION ?= 60
bench-serve: setup
	.venv/bin/python -m internvl_aot.bench.serve --artifact $(ARTIFACT) --clients $(CLIENTS) --duration $(DURATION)

clean:
	rm -rf build artifacts/*/ .pytest_cache

# Ship check, as a fleet operator does it: on the build server (this .venv) make a signing key, sign
# SHIP_ART (default: the demo artifact; e.g. SHIP_ART=artifacts/internvl-demo-tp1-cpu-fp32-x86-64-v3) and
# pack it into one bundle; on the "edge box" (a fresh venv with only the runtime's dependencies: no
# transformers, no test extras) put the public key in a trust store, receive the bundle, verify it,
# check the box, and run it. Needs `make demo` (or SHIP_ART compiled) first.
RT_VENV  := build/runtime-venv
SHIP_ART ?= $(DEMO_ART)
SHIP     := build/ship-check
EDGE     := $(CURDIR)/$(SHIP)/edge
check-runtime-venv: $(SHIP_ART)/manifest.json
	rm -rf $(RT_VENV) $(SHIP) build/shipped && python3 -m venv $(RT_VENV)
	$(RT_VENV)/bin/pip install -q "$(TORCH)"
	$(RT_VENV)/bin/pip install -q .
	$(RT_VENV)/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('transformers') is not None)"
	.venv/bin/internvl-artifact keygen -o $(SHIP)/keys/build-server
	cp -r $(SHIP_ART) $(SHIP)/art
	.venv/bin/internvl-artifact sign --key $(SHIP)/keys/build-server.key $(SHIP)/art
	.venv/bin/internvl-artifact pack $(SHIP)/art -o $(SHIP)/model.ivl
	mkdir -p $(EDGE)/trusted && cp $(SHIP)/keys/build-server.pub $(EDGE)/trusted/ && cp $(SHIP)/model.ivl $(EDGE)/
	cd /tmp && $(CURDIR)/$(RT_VENV)/bin/internvl-artifact verify --trusted-keys $(EDGE)/trusted $(EDGE)/model.ivl
	cd /tmp && $(CURDIR)/$(RT_VENV)/bin/internvl-run --artifact $(EDGE)/model.ivl --trusted-keys $(EDGE)/trusted --check
	cd /tmp && INTERNVL_CACHE_DIR=$(EDGE)/cache $(CURDIR)/$(RT_VENV)/bin/internvl-run --artifact $(EDGE)/model.ivl \
		--trusted-keys $(EDGE)/trusted --image $(CURDIR)/$(DEMO_IMAGE) --prompt "$(DEMO_QUESTION)" --max-new-tokens 8

# BACKEND=onnx on a box without torch: the demo model compiled to ONNX (OPSET, default 18) here, then a
# fresh venv with only the ONNX runtime's dependencies (runtime/onnx/requirements.txt: onnxruntime, numpy,
# pillow, safetensors, sentencepiece, tokenizers, cryptography; the project itself with --no-deps, so no
# torch) asks it the demo question; the answer must contain "yellow".
ONNX_VENV     := build/onnx-runtime-venv
ONNX_DEMO_ART ?= artifacts/internvl-demo-tp1-onnx-fp32$(if $(filter-out 18,$(OPSET)),-opset$(OPSET))
check-onnx-runtime-venv: setup
	test -f $(ONNX_DEMO_ART)/manifest.json || .venv/bin/internvl-compile --model internvl-demo --dtype fp32 \
		--backend onnx --opset $(OPSET) --out $(ONNX_DEMO_ART) --buckets "$(DEMO_BUCKETS)"
	rm -rf $(ONNX_VENV) && python3 -m venv $(ONNX_VENV)
	$(ONNX_VENV)/bin/pip install -q --no-deps .
	$(ONNX_VENV)/bin/pip install -q -r runtime/onnx/requirements.txt
	$(ONNX_VENV)/bin/python -c "import importlib.util as u, sys; bad = [m for m in ('torch', 'transformers', 'onnx') \
		if u.find_spec(m)]; print('not installed:', 'torch, transformers, onnx' if not bad else bad); sys.exit(bool(bad))"
	du -sh $(ONNX_VENV)
	cd /tmp && $(CURDIR)/$(ONNX_VENV)/bin/internvl-run --artifact $(CURDIR)/$(ONNX_DEMO_ART) --image $(CURDIR)/$(DEMO_IMAGE) \
		--prompt "$(DEMO_QUESTION)" --max-new-tokens 16 --threads 1 --json | tee $(CURDIR)/build/onnx-runtime-venv.out
	tail -1 build/onnx-runtime-venv.out | grep -qi yellow && echo "torch-free ONNX runtime: the answer contains yellow"
