"""internvl-serve: one engine loop behind five HTTP request formats.

- `protocol.py`: the internal request every format translates to, the error type, shared parsing
  (MindIE-style part lists, stop strings, sampling bounds);
- `media.py`: image loading and validation (data URIs, bare base64, allowed local paths, allowed hosts);
- `engine_loop.py`: the async front end over one `Engine` stepping in its own thread;
- `metrics.py`: Prometheus metrics;
- one module per request format: `mindie.py` (native `/infer`, `/v1/tokenizer`), `tgi.py`,
  `vllm.py`, `triton.py`, `openai.py`;
- `app.py`: the FastAPI application that wires them; `cli.py`: the `internvl-serve` command.
"""
