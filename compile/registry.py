"""Known InternVL models: their real architecture, chat template and input defaults.

`make compile MODEL=<name>` resolves a registry name here; `WEIGHTS=random` builds
random weights from the same config. A real checkpoint's own config.json always wins
over this table (see compile/checkpoint.py): the table only has to be right enough
for the shapes, and it is, as far as public sources let us check.

Sources (checked 2026 through the `search` tool, i.e. stored copies of public files):
- InternVL2-8B and InternVL2-26B: full copies of the real config.json (llm_config and
  vision_config, template, ps_version, select_layer, dynamic patch settings).
- LLM layer counts of every InternVL2 size: OpenGVLab's `split_model` helper
  (1B 24, 2B 24, 4B 32, 8B 32, 26B 48, 40B 60, 76B 80).
- InternViT-6B-448px-V1-5 model card: 45 blocks ("InternViT-6B originally had 48 blocks
  ... we simply discarded the last 3 blocks ... please make use of the features from
  the last layer"). It is built on InternViT-6B-448px-V1-2, which already had those
  45 blocks: the V1-2 fine-tune script uses `--vision_select_layer -1` with it.
- OpenGVLab fine-tune scripts: templates (`Hermes-2` for 1B, 40B and V1-2,
  `internlm2-chat` for V1-5/2B/8B/26B) and `--ps_version 'v2'` for 1B/40B/V1-5.
- Yi-34B shape (60 layers, 7168 hidden, 56 heads, 8 KV heads, 20480 mlp, vocab 64000).
- InternVLChatConfig defaults (ps_version 'v1', dynamic_image_size False, ...) for
  configs, like InternVL-Chat-V1-2's, that omit a field.
Everything else is from the base LLMs' published configs; a value marked UNVERIFIED
below could not be checked against a stored copy of the real config.json.

InternVL2.5 / InternVL3 / InternVL3.5 (checked 2026-12-01 through the `search` tool):
- InternVL3-1B(-Pretrained): a printed config (Qwen2.5-0.5B shape: 896 wide, 24 layers, 14 heads,
  2 KV heads, 4864 MLP, vocab 151674, rope dynamic factor 2.0, theta 1e6, max 32768; template
  internvl2_5, ps_version v2, select_layer -1, InternViT-300M: layer_norm, qkv_bias, no qk-norm)
  and its tokenizer (Qwen2.5's 151643 + 22 added tokens, eos <|im_end|>).
- InternVL3_5-8B config.json: Qwen3ForCausalLM, Qwen3-8B shape (4096 wide, 36 layers, 32 heads,
  8 KV heads, head_dim 128, 12288 MLP, vocab 151936, theta 1e6, rms 1e-6, max 40960, no rope
  scaling), ps_version v2.
- InternVL2_5-4B: a test fixture's copy (Qwen2.5-3B shape, vocab 151674, template internvl2_5);
  InternVL2_5-38B-AWQ config.json: Qwen2.5-32B-Instruct LLM (5120 wide, 27648 MLP).
- conversation.py (OpenGVLab/InternVL): the internvl2_5 and phi3-chat templates.
- Phi-3 LongRoPE factors: Phi-3-vision-128k-instruct's config (the same `su` release as
  Phi-3-mini-128k-instruct); InternVL2-4B's own factors are UNVERIFIED.
Every other value of these families is the base LLM's published shape from memory, marked UNVERIFIED.

Added tokens: InternVL appends 9 tokens to the base tokenizer in this order:
<img>, </img>, <IMG_CONTEXT>, <quad>, </quad>, <ref>, </ref>, <box>, </box>. So
vocab_size = base tokenizer length + 9 and <IMG_CONTEXT> = base length + 2
(InternLM2: 92544 + 2 = 92546, also what transformers' converter hard-codes;
Qwen2: 151646 + 2 = 151648).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from internvl_aot.graphs.config import LLMConfig, ModelConfig, VisionConfig


class UnsupportedModelError(ValueError):
    """A model the registry knows but the compiler cannot build yet."""


# ---------------------------------------------------------------- vision towers

def intern_vit_300m() -> VisionConfig:
    """InternViT-300M-448px (InternVL2-1B/2B/4B/8B). Verified: InternVL2-8B config.json."""
    return VisionConfig(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
                        norm_type="layer_norm", qkv_bias=True, qk_normalization=False,
                        layer_norm_eps=1e-6)


def intern_vit_6b(num_layers: int = 45) -> VisionConfig:
    """InternViT-6B-448px-V1-2 / V1-5 (45 of the original 48 blocks).

    Verified for V1-5: InternVL2-26B config.json. V1-2: 45 blocks per the V1-5 model
    card (V1-5 continues V1-2's pre-training and keeps its block count).
    """
    return VisionConfig(hidden_size=3200, num_layers=num_layers, num_heads=25, intermediate_size=12800,
                        norm_type="rms_norm", qkv_bias=False, qk_normalization=True,
                        layer_norm_eps=1e-6)


# ---------------------------------------------------------------- language models

def internlm2_chat_1_8b() -> LLMConfig:
    # Shape: internlm2-chat-1_8b. UNVERIFIED against InternVL2-2B's own config.json:
    # rope_scaling (dynamic, factor 2.0, as in the 8B's) and rms_norm_eps 1e-5.
    return LLMConfig(arch="internlm2", vocab_size=92553, hidden_size=2048, num_layers=24,
                     num_heads=16, num_kv_heads=8, intermediate_size=8192, rms_norm_eps=1e-5,
                     rope_theta=1_000_000.0, rope_scaling={"type": "dynamic", "factor": 2.0},
                     max_position_embeddings=32768)


def internlm2_5_7b_chat() -> LLMConfig:
    # Verified: InternVL2-8B config.json llm_config.
    return LLMConfig(arch="internlm2", vocab_size=92553, hidden_size=4096, num_layers=32,
                     num_heads=32, num_kv_heads=8, intermediate_size=14336, rms_norm_eps=1e-5,
                     rope_theta=1_000_000.0, rope_scaling={"type": "dynamic", "factor": 2.0},
                     max_position_embeddings=32768)


def internlm2_chat_20b(rope_factor: float = 3.0) -> LLMConfig:
    # Verified for InternVL2-26B (dynamic rope factor 3.0). InternVL-Chat-V1-5 uses the
    # same LLM; its rope factor is UNVERIFIED (2.0 assumed, internlm2-chat-20b's own).
    return LLMConfig(arch="internlm2", vocab_size=92553, hidden_size=6144, num_layers=48,
                     num_heads=48, num_kv_heads=8, intermediate_size=16384, rms_norm_eps=1e-5,
                     rope_theta=1_000_000.0, rope_scaling={"type": "dynamic", "factor": rope_factor},
                     max_position_embeddings=32768)


def qwen2_0_5b_instruct() -> LLMConfig:
    # Shape: Qwen2-0.5B-Instruct, vocab resized to 151643 + 3 specials + 9 InternVL tokens.
    # UNVERIFIED: vocab 151655 (derived) and untied lm_head (InternVL2-1B is "0.9B", which
    # fits an untied head; a tied checkpoint still loads: the loader copies embed_tokens).
    return LLMConfig(arch="qwen2", vocab_size=151655, hidden_size=896, num_layers=24,
                     num_heads=14, num_kv_heads=2, intermediate_size=4864, rms_norm_eps=1e-6,
                     rope_theta=1_000_000.0, rope_scaling=None, max_position_embeddings=32768,
                     qkv_bias=True, tie_word_embeddings=False)


def nous_hermes_2_yi_34b() -> LLMConfig:
    # Shape verified (Yi-34B). UNVERIFIED: vocab 64009 (= 64000 + 9 added tokens,
    # derived), rope_theta 5e6 and max_position_embeddings 4096 (Yi-34B's own values).
    return LLMConfig(arch="llama", vocab_size=64009, hidden_size=7168, num_layers=60,
                     num_heads=56, num_kv_heads=8, intermediate_size=20480, rms_norm_eps=1e-5,
                     rope_theta=5_000_000.0, rope_scaling=None, max_position_embeddings=4096)


def hermes_2_theta_llama_3_70b() -> LLMConfig:
    # Shape: Llama-3-70B. UNVERIFIED: vocab 128265 (= 128256 + 9, derived).
    return LLMConfig(arch="llama", vocab_size=128265, hidden_size=8192, num_layers=80,
                     num_heads=64, num_kv_heads=8, intermediate_size=28672, rms_norm_eps=1e-5,
                     rope_theta=500_000.0, rope_scaling=None, max_position_embeddings=8192)


def phi3_mini_128k() -> LLMConfig:
    # Shape: Phi-3-mini-128k-instruct (fused qkv_proj / gate_up_proj, split at load; LongRoPE with
    # original_max_position_embeddings 4096). UNVERIFIED: vocab 32020 (32011 + 9 InternVL tokens) and the
    # LongRoPE factors (PHI3_128K_SHORT / _LONG, see below).
    return LLMConfig(arch="phi3", vocab_size=32020, hidden_size=3072, num_layers=32,
                     num_heads=32, num_kv_heads=32, intermediate_size=8192, rms_norm_eps=1e-5,
                     rope_theta=10000.0, max_position_embeddings=131072,
                     rope_scaling={"type": "longrope", "short_factor": list(PHI3_128K_SHORT),
                                   "long_factor": list(PHI3_128K_LONG), "original_max_position_embeddings": 4096})


# ---------------------------------------------------------------- InternVL2.5 / 3 / 3.5 towers and LLMs

def intern_vit_300m_v2_5() -> VisionConfig:
    """InternViT-300M-448px-V2_5 (InternVL2.5-1B..8B, InternVL3-1B..14B, InternVL3.5-1B..14B): the
    300M shape. Verified: InternVL3-1B's printed vision_config (drop_path_rate is ignored at inference)."""
    return intern_vit_300m()


def intern_vit_6b_v2_5() -> VisionConfig:
    """InternViT-6B-448px-V2_5 (InternVL2.5-26B/38B/78B, InternVL3-38B/78B, InternVL3.5-38B).
    UNVERIFIED: 45 blocks, rms_norm, qk-norm and no qkv bias, as V1-5 (V2_5 is its continued training)."""
    return intern_vit_6b(45)


def qwen2_5(hidden: int, layers: int, heads: int, kv_heads: int, mlp: int, dynamic_rope: bool) -> LLMConfig:
    """A Qwen2.5 LLM inside InternVL2.5 / InternVL3: Qwen2's architecture, InternVL's vocabulary
    151674 (151643 + 22 Qwen2.5 added tokens + 9 InternVL tokens; verified for InternVL3-1B and
    InternVL2.5-4B). InternVL3's llm_config carries rope dynamic factor 2.0 (verified for
    InternVL3-1B, UNVERIFIED for the other sizes); InternVL2.5's is UNVERIFIED (none assumed).
    UNVERIFIED: untied lm_head for the sizes whose base Qwen2.5 ties it (0.5B, 1.5B, 3B)."""
    return LLMConfig(arch="qwen2", vocab_size=151674, hidden_size=hidden, num_layers=layers, num_heads=heads,
                     num_kv_heads=kv_heads, intermediate_size=mlp, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                     rope_scaling={"type": "dynamic", "factor": 2.0} if dynamic_rope else None,
                     max_position_embeddings=32768, qkv_bias=True)


# Qwen2.5 shapes (hidden, layers, heads, kv heads, mlp): the base models' published configs.
QWEN2_5 = {"0.5b": (896, 24, 14, 2, 4864),       # verified (InternVL3-1B)
           "1.5b": (1536, 28, 12, 2, 8960),      # UNVERIFIED
           "3b": (2048, 36, 16, 2, 11008),       # verified (InternVL2.5-4B fixture)
           "7b": (3584, 28, 28, 4, 18944),       # UNVERIFIED
           "14b": (5120, 48, 40, 8, 13824),      # UNVERIFIED
           "32b": (5120, 64, 40, 8, 27648),      # hidden / mlp verified (InternVL2.5-38B-AWQ), rest UNVERIFIED
           "72b": (8192, 80, 64, 8, 29568)}      # UNVERIFIED


def qwen3(hidden: int, layers: int, heads: int, kv_heads: int, mlp: int) -> LLMConfig:
    """A Qwen3 LLM inside InternVL3.5: head_dim 128 whatever the width, per-head q/k RMSNorm, no
    bias, vocab 151936 (Qwen3's padded embedding), theta 1e6, max 40960: verified for InternVL3.5-8B,
    UNVERIFIED for the other sizes. UNVERIFIED: untied lm_head for 0.6B/1.7B/4B (their base ties it)."""
    return LLMConfig(arch="qwen3", vocab_size=151936, hidden_size=hidden, num_layers=layers, num_heads=heads,
                     num_kv_heads=kv_heads, intermediate_size=mlp, head_dim=128, rms_norm_eps=1e-6,
                     rope_theta=1_000_000.0, rope_scaling=None, max_position_embeddings=40960, qk_norm=True)


QWEN3 = {"0.6b": (1024, 28, 16, 8, 3072),        # UNVERIFIED
         "1.7b": (2048, 28, 16, 8, 6144),        # UNVERIFIED
         "4b": (2560, 36, 32, 8, 9728),          # UNVERIFIED
         "8b": (4096, 36, 32, 8, 12288),         # verified (InternVL3_5-8B config.json)
         "14b": (5120, 40, 40, 8, 17408),        # UNVERIFIED
         "32b": (5120, 64, 64, 8, 25600)}        # UNVERIFIED


def internlm2_5_1_8b_chat() -> LLMConfig:
    # InternVL2.5-2B. UNVERIFIED: internlm2_5-1_8b-chat has internlm2-chat-1_8b's shape and rope settings.
    return internlm2_chat_1_8b()


def internlm2_5_20b_chat() -> LLMConfig:
    # InternVL2.5-26B. UNVERIFIED: internlm2-chat-20b's shape, dynamic rope factor 2.0.
    return internlm2_chat_20b(rope_factor=2.0)


def internlm3_8b_instruct() -> LLMConfig:
    # InternVL3-9B: InternLM3ForCausalLM, Llama's modules (separate q/k/v, no bias). UNVERIFIED (from
    # internlm3-8b-instruct's published config): 4096 wide, 48 layers, 32 heads, 2 KV heads, head_dim 128,
    # 10240 MLP, vocab 128512, rope theta 5e7 with dynamic factor 6.0, rms 1e-5, max 32768.
    return LLMConfig(arch="internlm3", vocab_size=128512, hidden_size=4096, num_layers=48, num_heads=32,
                     num_kv_heads=2, intermediate_size=10240, head_dim=128, rms_norm_eps=1e-5,
                     rope_theta=50_000_000.0, rope_scaling={"type": "dynamic", "factor": 6.0},
                     max_position_embeddings=32768)


# Phi-3-vision-128k-instruct's `su` factors (48 = head_dim 96 / 2), used for InternVL2-4B: UNVERIFIED there.
PHI3_128K_SHORT = [1.05, 1.05, 1.05, 1.1, 1.1, 1.1, 1.25, 1.25, 1.4, 1.45, 1.55, 1.85, 1.9] + [2.0] * 19 + [
    2.1, 2.1, 2.2, 2.35, 2.35, 2.35, 2.35, 2.4, 2.4, 2.65, 2.7, 2.9, 2.95, 3.05, 3.05, 3.05]
PHI3_128K_LONG = [1.03, 1.05, 1.05, 1.08, 1.23, 1.23, 1.3, 1.45, 1.6, 1.65, 1.9, 2.86, 3.69, 5.42, 5.49, 5.49,
                  9.09, 11.58, 15.66, 15.77, 15.79, 18.36, 21.99, 23.08, 30.01, 32.35, 32.59, 35.56, 39.95,
                  53.84, 56.2, 57.95, 59.29, 59.77, 59.92, 61.19, 61.96, 62.5, 63.37, 63.48, 63.48, 63.66,
                  63.85, 64.08, 64.76, 64.8, 64.81, 64.81]


# ---------------------------------------------------------------- the demo model

def demo_vit() -> VisionConfig:
    """models/internvl-demo's encoder: InternViT-300M's kind (LayerNorm, qkv bias) at toy width."""
    return VisionConfig(hidden_size=96, num_layers=2, num_heads=3, intermediate_size=384,
                        norm_type="layer_norm", qkv_bias=True, qk_normalization=False,
                        layer_norm_eps=1e-6)


def demo_llm() -> LLMConfig:
    # models/internvl-demo/config.json's llm_config (tools/train_demo_model.py): InternLM2, toy width.
    return LLMConfig(arch="internlm2", vocab_size=DEMO_VOCAB, hidden_size=192, num_layers=3,
                     num_heads=6, num_kv_heads=6, intermediate_size=512, rms_norm_eps=1e-5,
                     rope_theta=1_000_000.0, rope_scaling=None, max_position_embeddings=4096)


DEMO_VOCAB = 609                  # its SentencePiece model's 600 pieces + InternVL's 9 added tokens
DEMO_IMAGE_CONTEXT_ID = 602


# ---------------------------------------------------------------- the table

@dataclass(frozen=True)
class RegistryEntry:
    name: str
    hf_repo: str                          # where the original checkpoint lives on the Hub
    vision: Callable[[], VisionConfig]
    llm: Callable[[], LLMConfig]
    template: str
    ps_version: str = "v2"
    select_layer: int = -1
    dynamic_image_size: bool = True
    use_thumbnail: bool = True
    max_dynamic_patch: int = 12
    image_context_token_id: int = -1      # -1: not known for this tokenizer
    unsupported: Optional[str] = None     # why the compiler cannot build it yet
    local_dir: Optional[str] = None       # a checkpoint that ships in this repository (relative to its root)


_ENTRIES = [
    RegistryEntry(
        # A small trained model of InternVL2's architecture (InternLM2 backbone), in the repository:
        # it answers questions about synthetic pictures (shapes, colours, counts, words, numbers).
        # One 448x448 tile per picture.
        "internvl-demo", "", demo_vit, demo_llm, template="internlm2-chat", max_dynamic_patch=1,
        image_context_token_id=DEMO_IMAGE_CONTEXT_ID, local_dir="models/internvl-demo"),
    RegistryEntry(
        "internvl-chat-v1-2", "OpenGVLab/InternVL-Chat-V1-2", intern_vit_6b, nous_hermes_2_yi_34b,
        template="Hermes-2",
        # Single 448 tile. ps_version: the config has none, so InternVLChatConfig's default
        # 'v1' applies (UNVERIFIED beyond that default and the pixel-shuffle warning).
        ps_version="v1", dynamic_image_size=False, use_thumbnail=False, max_dynamic_patch=6),
    RegistryEntry(
        "internvl-chat-v1-5", "OpenGVLab/InternVL-Chat-V1-5", intern_vit_6b,
        lambda: internlm2_chat_20b(rope_factor=2.0),
        # ps_version 'v2' from OpenGVLab's V1-5 fine-tune script (UNVERIFIED in config.json).
        template="internlm2-chat", image_context_token_id=92546),
    RegistryEntry(
        "internvl2-1b", "OpenGVLab/InternVL2-1B", intern_vit_300m, qwen2_0_5b_instruct,
        template="Hermes-2", image_context_token_id=151648),  # derived, see module doc
    RegistryEntry(
        "internvl2-2b", "OpenGVLab/InternVL2-2B", intern_vit_300m, internlm2_chat_1_8b,
        template="internlm2-chat", image_context_token_id=92546),
    RegistryEntry(
        "internvl2-4b", "OpenGVLab/InternVL2-4B", intern_vit_300m, phi3_mini_128k,
        # UNVERIFIED: <IMG_CONTEXT> = 32011 + 2 (derived as for the other tokenizers).
        template="phi3-chat", image_context_token_id=32013),
    RegistryEntry(
        "internvl2-8b", "OpenGVLab/InternVL2-8B", intern_vit_300m, internlm2_5_7b_chat,
        template="internlm2-chat", image_context_token_id=92546),
    RegistryEntry(
        "internvl2-26b", "OpenGVLab/InternVL2-26B", intern_vit_6b, internlm2_chat_20b,
        template="internlm2-chat", image_context_token_id=92546),
    RegistryEntry(
        "internvl2-40b", "OpenGVLab/InternVL2-40B", intern_vit_6b, nous_hermes_2_yi_34b,
        template="Hermes-2"),
    RegistryEntry(
        "internvl2-76b", "OpenGVLab/InternVL2-Llama3-76B", intern_vit_6b, hermes_2_theta_llama_3_70b,
        # UNVERIFIED: template (Hermes-2-Theta speaks ChatML like Hermes-2).
        template="Hermes-2"),
]



def _q25(size: str, dynamic_rope: bool):
    return lambda: qwen2_5(*QWEN2_5[size], dynamic_rope=dynamic_rope)


def _q3(size: str):
    return lambda: qwen3(*QWEN3[size])


# <IMG_CONTEXT>: Qwen2.5 151643 + 22 + 2 = 151667 (verified: InternVL3 vocab 151674 and the -hf configs'
# image_token_id); Qwen3 151643 + 26 + 2 = 151671 (UNVERIFIED, derived); InternLM2 92546 (as InternVL2).
_Q25_IMG, _Q3_IMG = 151667, 151671
_NEW = [  # (name, hub repo, vision, llm, image context id); all: template internvl2_5 (UNVERIFIED for
    # InternVL3.5, whose conversation.py has no template of its own for the dense models), ps v2, layer -1
    ("internvl2.5-1b", "OpenGVLab/InternVL2_5-1B", intern_vit_300m_v2_5, _q25("0.5b", False), _Q25_IMG),
    ("internvl2.5-2b", "OpenGVLab/InternVL2_5-2B", intern_vit_300m_v2_5, internlm2_5_1_8b_chat, 92546),
    ("internvl2.5-4b", "OpenGVLab/InternVL2_5-4B", intern_vit_300m_v2_5, _q25("3b", False), _Q25_IMG),
    ("internvl2.5-8b", "OpenGVLab/InternVL2_5-8B", intern_vit_300m_v2_5, internlm2_5_7b_chat, 92546),
    ("internvl2.5-26b", "OpenGVLab/InternVL2_5-26B", intern_vit_6b_v2_5, internlm2_5_20b_chat, 92546),
    ("internvl2.5-38b", "OpenGVLab/InternVL2_5-38B", intern_vit_6b_v2_5, _q25("32b", False), _Q25_IMG),
    ("internvl2.5-78b", "OpenGVLab/InternVL2_5-78B", intern_vit_6b_v2_5, _q25("72b", False), _Q25_IMG),
    ("internvl3-1b", "OpenGVLab/InternVL3-1B", intern_vit_300m_v2_5, _q25("0.5b", True), _Q25_IMG),
    ("internvl3-2b", "OpenGVLab/InternVL3-2B", intern_vit_300m_v2_5, _q25("1.5b", True), _Q25_IMG),
    ("internvl3-8b", "OpenGVLab/InternVL3-8B", intern_vit_300m_v2_5, _q25("7b", True), _Q25_IMG),
    ("internvl3-9b", "OpenGVLab/InternVL3-9B", intern_vit_300m_v2_5, internlm3_8b_instruct, -1),
    ("internvl3-14b", "OpenGVLab/InternVL3-14B", intern_vit_300m_v2_5, _q25("14b", True), _Q25_IMG),
    ("internvl3-38b", "OpenGVLab/InternVL3-38B", intern_vit_6b_v2_5, _q25("32b", True), _Q25_IMG),
    ("internvl3-78b", "OpenGVLab/InternVL3-78B", intern_vit_6b_v2_5, _q25("72b", True), _Q25_IMG),
    ("internvl3.5-1b", "OpenGVLab/InternVL3_5-1B", intern_vit_300m_v2_5, _q3("0.6b"), _Q3_IMG),
    ("internvl3.5-2b", "OpenGVLab/InternVL3_5-2B", intern_vit_300m_v2_5, _q3("1.7b"), _Q3_IMG),
    ("internvl3.5-4b", "OpenGVLab/InternVL3_5-4B", intern_vit_300m_v2_5, _q3("4b"), _Q3_IMG),
    ("internvl3.5-8b", "OpenGVLab/InternVL3_5-8B", intern_vit_300m_v2_5, _q3("8b"), _Q3_IMG),
    ("internvl3.5-14b", "OpenGVLab/InternVL3_5-14B", intern_vit_300m_v2_5, _q3("14b"), _Q3_IMG),
    ("internvl3.5-38b", "OpenGVLab/InternVL3_5-38B", intern_vit_6b_v2_5, _q3("32b"), _Q3_IMG),
]
_ENTRIES += [RegistryEntry(n, repo, vit, llm, template="internvl2_5", image_context_token_id=img)
             for n, repo, vit, llm, img in _NEW]
# Known, refused with the loader's message (compile/checkpoint.py MOE_UNSUPPORTED); README says the same.
# Their vision/llm entries are placeholders (a dense Qwen3 shape), never built.
_MOE = "its mixture-of-experts language model is not supported yet"
_ENTRIES += [
    RegistryEntry("internvl3.5-30b-a3b", "OpenGVLab/InternVL3_5-30B-A3B", intern_vit_300m_v2_5, _q3("0.6b"),
                  template="internvl2_5", unsupported=_MOE + " (Qwen3-30B-A3B MoE)"),
    RegistryEntry("internvl3.5-241b-a28b", "OpenGVLab/InternVL3_5-241B-A28B", intern_vit_6b_v2_5, _q3("0.6b"),
                  template="internvl2_5", unsupported=_MOE + " (Qwen3-235B-A22B MoE)"),
    RegistryEntry("internvl3.5-gpt-oss-20b-a4b", "OpenGVLab/InternVL3_5-GPT-OSS-20B-A4B-Preview",
                  intern_vit_300m_v2_5, _q3("0.6b"), template="internvl2_5",
                  unsupported=_MOE + " (GPT-OSS-20B, and its internvl3_5_gpt_oss template)"),
]

REGISTRY: dict[str, RegistryEntry] = {e.name: e for e in _ENTRIES}


def _normalize(name: str) -> str:
    return name.strip().rstrip("/").lower()


def registry_entry(name: str) -> RegistryEntry:
    """The entry for a registry name or its Hub repo id (case-insensitive), supported or not."""
    key = _normalize(name)
    for entry in _ENTRIES:
        repo = entry.hf_repo.lower()
        if key == entry.name or (repo and key in (repo, repo.split("/")[-1])):
            return entry
    raise KeyError(f"unknown model {name!r}; known: {', '.join(REGISTRY)}")


def is_registry_name(name: str) -> bool:
    try:
        registry_entry(name)
        return True
    except KeyError:
        return False


def registry_config(name: str, allow_unsupported: bool = False) -> ModelConfig:
    """The canonical ModelConfig of a known model.

    Raises KeyError for an unknown name and UnsupportedModelError for a known model the
    compiler cannot build (unless allow_unsupported, e.g. to inspect its shapes).
    """
    e = registry_entry(name)
    if e.unsupported and not allow_unsupported:
        raise UnsupportedModelError(f"{e.name} ({e.hf_repo}) is not supported: {e.unsupported}")
    return ModelConfig(
        name=e.name, vision=e.vision(), llm=e.llm(), select_layer=e.select_layer,
        ps_version=e.ps_version, downsample_ratio=0.5, template=e.template,
        dynamic_image_size=e.dynamic_image_size, use_thumbnail=e.use_thumbnail,
        min_dynamic_patch=1, max_dynamic_patch=e.max_dynamic_patch,
        image_context_token_id=e.image_context_token_id,
        extra={"source": "registry", "hf_repo": e.hf_repo},
    )


def list_models(include_unsupported: bool = True) -> list[str]:
    return [e.name for e in _ENTRIES if include_unsupported or not e.unsupported]
