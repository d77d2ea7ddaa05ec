"""The runtime spec: the typed, validated view of the manifest fields the engine runs from.

compile/spec.py fills it (`RuntimeSpec(...)`) and the artifact writer stores `to_dict()` in
manifest.json; the runtime parses it once (`RuntimeSpec.from_dict`) and never indexes the raw
dict again. Every field is checked when parsed, so a manifest that lacks one or contradicts
itself (a context bucket that is not a multiple of the block size, a dtype name this runtime
does not know) is refused with a message naming the field, before any graph is loaded.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

try:
    import torch
except ImportError:         # only the ONNX runtime installed (runtime/onnx/): no torch on this box
    torch = None

from .errors import ArtifactError

DTYPES = ({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32} if torch is not None
          else dict.fromkeys(("bf16", "fp16", "fp32")))   # the "dtype" field (names only without torch)


@dataclass(frozen=True)
class LLMDims:
    """What the runtime needs of the language model: the KV pool's shape and the vocabulary."""
    num_layers: int
    hidden_size: int
    head_dim: int
    num_kv_heads: int
    vocab_size: int


@dataclass(frozen=True)
class BucketSpec:
    vision: tuple[int, ...]
    prefill: tuple[int, ...]
    batch: tuple[int, ...]
    context: tuple[int, ...]
    block_size: int

    @property
    def max_context(self) -> int:
        return max(self.context)

    @property
    def max_batch(self) -> int:
        return max(self.batch)

    @property
    def blocks_per_seq(self) -> int:
        return -(-self.max_context // self.block_size)

    def to_dict(self) -> dict:
        return {"vision": list(self.vision), "prefill": list(self.prefill), "batch": list(self.batch),
                "context": list(self.context), "block_size": self.block_size}


@dataclass(frozen=True)
class ImageSpec:
    image_size: int
    num_image_token: int
    dynamic_image_size: bool
    use_thumbnail: bool
    min_dynamic_patch: int
    max_dynamic_patch: int


@dataclass(frozen=True)
class ChatSpec:
    template: str
    system: str


@dataclass(frozen=True)
class GenerationSpec:
    stop_token_ids: tuple[int, ...]          # the template's separator: ends every generation
    eos_token_ids: tuple[int, ...] = ()      # the tokenizer's EOS: only with SamplingParams.stop_at_eos
    stop_strings: tuple[str, ...] = ()


@dataclass(frozen=True)
class RuntimeSpec:
    model_name: str
    config: dict                             # the whole model config (graphs/config.py ModelConfig.to_dict())
    dtype: str
    buckets: BucketSpec
    chat: ChatSpec
    image: ImageSpec
    generation: GenerationSpec
    tp: int = 1
    rank_kv_heads: int = 0                   # KV heads of one rank's pool (all of them at tp=1)
    tp_group: Optional[str] = None
    llm: LLMDims = field(init=False)

    def __post_init__(self):
        llm = self.config["llm"]
        object.__setattr__(self, "llm", LLMDims(int(llm["num_layers"]), int(llm["hidden_size"]), int(llm["head_dim"]),
                                                int(llm["num_kv_heads"]), int(llm["vocab_size"])))
        if self.dtype not in DTYPES:
            raise ArtifactError(f"manifest dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        b = self.buckets
        if b.block_size < 1 or any(c % b.block_size for c in b.context):
            raise ArtifactError(f"manifest buckets: every context bucket {list(b.context)} must be a multiple of "
                                f"block_size {b.block_size}")
        if not (b.vision and b.prefill and b.batch and b.context):
            raise ArtifactError(f"manifest buckets: every stage needs at least one bucket, got {b.to_dict()}")
        if self.tp < 1 or not 1 <= self.rank_kv_heads <= self.llm.num_kv_heads:
            raise ArtifactError(f"manifest: tp {self.tp} with {self.rank_kv_heads} KV heads per rank does not fit "
                                f"the model's {self.llm.num_kv_heads}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def vision_image_size(self) -> int:
        return int(self.config["vision"]["image_size"])

    @property
    def image_context_token_id(self) -> int:
        return int(self.config["image_context_token_id"])

    @classmethod
    def from_dict(cls, d: dict) -> "RuntimeSpec":
        try:
            return cls(
                model_name=d["model"]["name"], config=d["model"]["config"], dtype=d["dtype"],
                buckets=BucketSpec(*(tuple(sorted(int(x) for x in d["buckets"][k]))
                                     for k in ("vision", "prefill", "batch", "context")),
                                   int(d["buckets"]["block_size"])),
                chat=ChatSpec(d["chat"]["template"], d["chat"]["system"]),
                image=ImageSpec(**d["image"]),
                generation=GenerationSpec(tuple(d["generation"]["stop_token_ids"]),
                                          tuple(d["generation"].get("eos_token_ids", ())),
                                          tuple(d["generation"].get("stop_strings", ()))),
                tp=int(d.get("tp", 1)), rank_kv_heads=int(d["rank"]["kv_heads"]), tp_group=d.get("tp_group"))
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"the manifest's runtime fields are incomplete or malformed ({type(e).__name__}: "
                                f"{e}): re-compile the artifact") from None

    def to_dict(self) -> dict[str, Any]:
        out = {"model": {"name": self.model_name, "config": self.config}, "dtype": self.dtype,
               "buckets": self.buckets.to_dict(), "tp": self.tp, "rank": {"kv_heads": self.rank_kv_heads},
               "chat": asdict(self.chat), "image": asdict(self.image),
               "generation": {"stop_token_ids": list(self.generation.stop_token_ids),
                              "eos_token_ids": list(self.generation.eos_token_ids),
                              "stop_strings": list(self.generation.stop_strings)}}
        if self.tp_group is not None:
            out["tp_group"] = self.tp_group
        return out
