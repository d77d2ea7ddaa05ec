"""An artifact's LLM weights as a GGUF file that llama.cpp loads (for `internvl-bench --compare llama.cpp`).

    python -m internvl_aot.bench.gguf_export --artifact DIR --out FILE.gguf --type f16|bf16|q8_0|q4_0|f32

What is written, and why:
- The weights are the artifact's own (rank0/weights.safetensors), un-fused back to the canonical
  q/k/v and gate/up (bench/hf_weights.canonical_from_artifact), then named and laid out as
  llama.cpp's own converter (convert_hf_to_gguf.py) writes them: arch `internlm2` for an InternLM2
  backbone, `llama` for a Llama one, `qwen2` for Qwen2 (q/k/v biases). InternLM2 and Llama use
  llama.cpp's "normal" RoPE (adjacent pairs), so the q and k rows are permuted from the rotate-half
  layout the way the converter does it (`permute` below); Qwen2 uses the NeoX (rotate-half) RoPE
  and needs none. The vision tower and projector are not written: llama.cpp runs the LLM only.
- 2-D weights in the requested type (q8_0 and q4_0 through gguf.quants, as the converter's
  `--outtype q8_0` does, token embedding and output head included: `llama-quantize` would keep the
  output head of a q4_0 file in q6_K, here every matrix is q4_0, the peer of our int4 that
  quantises the output head too); rows whose length is not a multiple of 32 in f16; 1-D tensors
  (norms, biases) in f32, as llama.cpp expects them.
- RoPE scaling: `linear` is written as such; `dynamic` NTK (InternVL2-2B's InternLM2) only changes
  the frequencies past max_position_embeddings (32k), which the benchmark never reaches, so it is
  left out (llama.cpp has no dynamic NTK); anything else is refused.
- The vocabulary is a stand-in of the right size: a SentencePiece-type ("llama") vocab with
  <unk>/<s>/</s>, the 256 byte tokens and a placeholder per remaining id. The benchmark hands
  llama.cpp token ids, never text, so only the size and validity matter; the artifact's own
  tokenizer is not carried over.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

ARCHS = {"internlm2": "internlm2", "llama": "llama", "qwen2": "qwen2"}   # ours -> llama.cpp's
PERMUTED_ROPE = {"internlm2", "llama"}                                    # "normal" RoPE in llama.cpp
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
BLOCKED = {"q8_0", "q4_0"}   # 32 weights a block: rows of another length are written in f16
_LAYER = {  # canonical suffix under language_model.layers.N. -> GGUF name under blk.N.
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP = {"language_model.embed_tokens.weight": "token_embd.weight",
        "language_model.norm.weight": "output_norm.weight",
        "language_model.lm_head.weight": "output.weight"}


class GGUFExportError(ValueError):
    pass


def gguf_name(canonical: str) -> str:
    if canonical in _TOP:
        return _TOP[canonical]
    m = re.match(r"language_model\.layers\.(\d+)\.(.*)$", canonical)
    if m and m[2] in _LAYER:
        return f"blk.{m[1]}.{_LAYER[m[2]]}"
    raise GGUFExportError(f"no GGUF name for {canonical} (a backbone feature this exporter does not write)")


def permute(w, n_head: int):
    """Rotate-half rows -> adjacent-pair rows per head (llama.cpp's LlamaModel.permute); works on
    numpy arrays and torch tensors, weights [rows, in] and biases [rows]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w, n_head: int):
    """The inverse of `permute` (for tests and checks)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llm_tensors(manifest: dict, weights: dict):
    """The artifact's weights -> [(gguf name, canonical name, torch tensor in llama.cpp's layout)]."""
    from .hf_weights import canonical_from_artifact

    llm = manifest["model"]["config"]["llm"]
    if llm["arch"] not in ARCHS:
        raise GGUFExportError(f"backbone {llm['arch']!r}: the GGUF exporter writes {sorted(ARCHS)} only")
    canonical = canonical_from_artifact(manifest, weights)
    out = []
    for key in sorted((k for k in canonical if k.startswith("language_model.")),
                      key=lambda k: (k not in ("language_model.embed_tokens.weight",), _layer_index(k), k)):
        t = canonical[key]
        if llm["arch"] in PERMUTED_ROPE:
            if ".self_attn.q_proj." in key:
                t = permute(t, llm["num_heads"])
            elif ".self_attn.k_proj." in key:
                t = permute(t, llm["num_kv_heads"])
        out.append((gguf_name(key), key, t))
    return out


def _layer_index(key: str) -> int:
    m = re.match(r"language_model\.layers\.(\d+)\.", key)
    return int(m[1]) if m else 1 << 30


def _encode(t, qtype: str):
    """torch tensor -> (numpy array to write, GGML type). 1-D tensors stay f32."""
    import gguf
    import torch
    from gguf import GGMLQuantizationType as Q
    a32 = t.detach().to(torch.float32).contiguous().numpy()
    if t.dim() == 1 or qtype == "f32":
        return a32, Q.F32
    if qtype == "f16":
        return a32.astype(np.float16), Q.F16
    if qtype == "bf16":
        return gguf.quants.quantize(a32, Q.BF16), Q.BF16
    if qtype in BLOCKED:
        if a32.shape[-1] % 32:
            return a32.astype(np.float16), Q.F16   # as the converter does for rows it cannot block
        gt = Q.Q8_0 if qtype == "q8_0" else Q.Q4_0
        return gguf.quants.quantize(a32, gt), gt
    raise GGUFExportError(f"GGUF type {qtype!r}: choose from {TYPES}")


def _nbytes(shape, gtype) -> int:
    from gguf import GGML_QUANT_SIZES
    block, size = GGML_QUANT_SIZES[gtype]
    n = int(np.prod(shape))
    return n // block * size


def stand_in_vocab(n: int):
    """(tokens, scores, token types) for n ids: <unk> <s> </s>, the byte tokens, placeholders."""
    from gguf import TokenType
    tokens = ["<unk>", "<s>", "</s>"][:n]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL][:n]
    for b in range(min(256, n - len(tokens))):
        tokens.append(f"<0x{b:02X}>")
        types.append(TokenType.BYTE)
    while len(tokens) < n:
        tokens.append(f"[{len(tokens)}]")
        types.append(TokenType.NORMAL)
    return tokens, [0.0] * n, types


def export(artifact: Path, out: Path, qtype: str, log=print) -> dict:
    """Write `out`; returns {'path', 'type', 'bytes', 'tensors', 'seconds', 'arch'}."""
    import gguf

    from ..runtime import weights_file

    if qtype not in TYPES:
        raise GGUFExportError(f"GGUF type {qtype!r}: choose from {TYPES}")
    t0 = time.perf_counter()
    artifact = Path(artifact)
    manifest = json.loads((artifact / "manifest.json").read_text())
    llm = manifest["model"]["config"]["llm"]
    if llm["num_heads"] * llm["head_dim"] != llm["hidden_size"] and llm["arch"] == "internlm2":
        raise GGUFExportError("llama.cpp's internlm2 needs num_heads * head_dim == hidden_size")
    scaling = llm.get("rope_scaling") or {}
    kind = scaling.get("type") or scaling.get("rope_type")
    if kind not in (None, "dynamic", "linear"):
        raise GGUFExportError(f"RoPE scaling {kind!r} has no GGUF equivalent here")
    weights = weights_file.read(artifact / manifest["ranks"][0]["weights"])
    tensors = llm_tensors(manifest, weights)
    arch = ARCHS[llm["arch"]]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(f"{manifest['model']['name']} LLM ({qtype}, from {artifact.name})")
    w.add_context_length(llm["max_position_embeddings"])
    w.add_embedding_length(llm["hidden_size"])
    w.add_block_count(llm["num_layers"])
    w.add_feed_forward_length(llm["intermediate_size"])
    w.add_head_count(llm["num_heads"])
    w.add_head_count_kv(llm["num_kv_heads"])
    w.add_key_length(llm["head_dim"])
    w.add_value_length(llm["head_dim"])
    w.add_rope_dimension_count(llm["head_dim"])
    w.add_rope_freq_base(float(llm["rope_theta"]))
    w.add_layer_norm_rms_eps(float(llm["rms_norm_eps"]))
    w.add_vocab_size(llm["vocab_size"])
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                     "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, scores, types = stand_in_vocab(llm["vocab_size"])
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    if llm["vocab_size"] >= 3:
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)

    # Streamed: the tensor infos first (shapes and types are known without converting), then each
    # tensor converted and written in turn, so at most one converted matrix is in memory.
    from gguf import GGMLQuantizationType as Q
    plan = []
    for name, _, t in tensors:
        shape = tuple(t.shape)
        if t.dim() == 1 or qtype == "f32":
            gt = Q.F32
        elif qtype in BLOCKED and shape[-1] % 32:
            gt = Q.F16
        else:
            gt = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[qtype]
        plan.append(gt)
        w.add_tensor_info(name, shape, np.dtype(np.float32 if gt == Q.F32 else np.float16), _nbytes(shape, gt),
                          raw_dtype=gt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for (name, _, t), gt in zip(tensors, plan):
        arr, got = _encode(t, qtype)
        assert got == gt, (name, got, gt)
        w.write_tensor_data(arr)
    w.close()
    tmp.replace(out)
    info = {"path": str(out), "type": qtype, "arch": arch, "bytes": out.stat().st_size, "tensors": len(tensors),
            "seconds": round(time.perf_counter() - t0, 1)}
    log(f"[gguf] wrote {out} ({info['bytes'] / 1e6:.0f} MB, {len(tensors)} tensors, {qtype}, arch {arch}) "
        f"in {info['seconds']} s")
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m internvl_aot.bench.gguf_export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--out", required=True, help="the .gguf file to write")
    ap.add_argument("--type", default="f16", choices=TYPES)
    args = ap.parse_args(argv)
    try:
        import gguf  # noqa: F401
    except ImportError:
        print("error: the GGUF writer needs the `gguf` package: pip install -e '.[llamacpp]'", file=sys.stderr)
        return 2
    try:
        info = export(Path(args.artifact), Path(args.out), args.type, log=lambda m: print(m, file=sys.stderr))
    except (GGUFExportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
