#!/usr/bin/env python3
"""Write a tiny random InternVL2 checkpoint in the original OpenGVLab format (InternLM2
backbone with packed wqkv, InternViT-300M-style encoder, SentencePiece tokenizer with
InternVL's added tokens), the same generator the tests use. For `make demo`.

usage: tools/make_tiny_checkpoint.py OUT_DIR
"""
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny_checkpoints import SPECS, build_hf_checkpoint, write_original  # noqa: E402


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(sys.argv[1])
    if (out / "config.json").is_file():
        print(f"{out} exists, reusing it")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(tmp) / "hf"
        build_hf_checkpoint(SPECS["llama_vit300m"], hf)
        if out.exists():
            shutil.rmtree(out)
        write_original(hf, out, "internlm2")
    print(f"wrote a tiny InternVL2 checkpoint (original format, InternLM2 backbone) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
