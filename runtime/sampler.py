"""Next-token selection: per-request `SamplingParams` and a batched `Sampler`.

The logits processing copies transformers' `generate` for the same settings, operation for
operation, so a request here and `model.generate(...)` there pick the same token from the same
logits: repetition penalty (`RepetitionPenaltyLogitsProcessor`, applied for greedy too), then,
only when sampling, temperature, top-k and top-p (`TemperatureLogitsWarper`, `TopKLogitsWarper`,
`TopPLogitsWarper`, min_tokens_to_keep=1), then softmax + `torch.multinomial`. Greedy is argmax
(first index on ties).

Parameters differ per row, so each step is vectorised over rows with per-row values. Where all
rows share a value it is applied as a Python scalar, exactly as transformers does (CUDA turns
division by a scalar into multiplication by its reciprocal; division by a tensor is exact
division, which can differ in the last bit).

Reproducibility: each sampled sequence draws from its own `torch.Generator` (`make_generator`),
so its tokens depend on its seed and its logits only, not on which other requests share the
batch. A fresh generator seeded with `seed` is in the state `torch.manual_seed(seed)` leaves the
default generator in, so a batch-1 transformers run seeded that way draws the same tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

try:
    import torch
except ImportError:         # only the ONNX runtime installed (runtime/onnx/): no torch on this box
    torch = None


@dataclass
class SamplingParams:
    temperature: float = 0.0             # 0: greedy
    top_k: int = 0                       # 0: off
    top_p: float = 1.0                   # 1.0: off
    repetition_penalty: float = 1.0      # 1.0: off; >1 discourages tokens already in the history
    seed: int | None = None              # None: a fresh random seed per request
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's EOS tokens
    ignore_eos: bool = False
    # Also stop at the tokenizer's EOS (manifest generation.eos_token_ids), not only at the chat
    # template's separator (generation.stop_token_ids), which is all the original chat() stops at.
    stop_at_eos: bool = False

    def __post_init__(self):
        self.stop_token_ids = tuple(self.stop_token_ids)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The per-sequence random stream, created once when the request arrives (None for greedy)."""
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


class Sampler:
    """Picks one token per row of fp32 logits `[B, V]`.

    `vocab_limit` is the number of real vocabulary entries; columns past it (padding of a padded
    output head) are set to -inf first, so they can never be chosen.
    """

    def __init__(self, vocab_limit: int | None = None):
        self.vocab_limit = vocab_limit

    def __call__(self, logits: torch.Tensor, params: Sequence[SamplingParams],
                 history: Sequence[Sequence[int] | torch.Tensor] | None = None,
                 generators: Sequence[torch.Generator | None] | None = None) -> torch.Tensor:
        """Next token ids `[B]` (int64, on the logits' device).

        `history[i]`: the token ids the repetition penalty looks at for row i (transformers
        counts the prompt and the generated tokens; InternVL's own `chat()` passes only
        embeddings, so there only the generated ones count: the caller chooses). `generators[i]`
        comes from `make_generator`; None draws from torch's global generator.
        """
        scores = self.penalize(logits, params, history)
        next_tokens = scores.argmax(dim=-1)
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if rows:
            idx = torch.tensor(rows, device=scores.device)
            warped = self.warp(scores.index_select(0, idx), [params[i] for i in rows])
            probs = torch.softmax(warped, dim=-1)
            for j, i in enumerate(rows):
                gen = generators[i] if generators is not None else None
                next_tokens[i] = torch.multinomial(probs[j:j + 1], 1, generator=gen)[0, 0]
        return next_tokens

    def process(self, logits: torch.Tensor, params: Sequence[SamplingParams],
                history: Sequence[Sequence[int] | torch.Tensor] | None = None) -> torch.Tensor:
        """The scores the final softmax/argmax sees, all rows (greedy rows only penalised)."""
        scores = self.penalize(logits, params, history)
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if rows:
            idx = torch.tensor(rows, device=scores.device)
            scores = scores.index_copy(0, idx, self.warp(scores.index_select(0, idx), [params[i] for i in rows]))
        return scores

    def penalize(self, logits: torch.Tensor, params: Sequence[SamplingParams],
                 history: Sequence[Sequence[int] | torch.Tensor] | None) -> torch.Tensor:
        """vocab_limit mask, then repetition penalty (RepetitionPenaltyLogitsProcessor)."""
        if logits.dim() != 2 or logits.shape[0] != len(params):
            raise ValueError(f"logits must be [B, V] with B = len(params) = {len(params)}, got {tuple(logits.shape)}")
        scores = logits.float()
        vocab = scores.shape[-1]
        if self.vocab_limit is not None and self.vocab_limit < vocab:
            scores = scores.masked_fill(torch.arange(vocab, device=scores.device) >= self.vocab_limit, float("-inf"))
        penalties = [p.repetition_penalty for p in params]
        if all(x == 1.0 for x in penalties):
            return scores
        if history is None or len(history) != len(params):
            raise ValueError("repetition_penalty needs one history of token ids per row")
        # One extra column absorbs ids >= V (transformers ignores them the same way).
        seen = torch.zeros(len(params), vocab + 1, dtype=torch.bool, device=scores.device)
        for i, ids in enumerate(history):
            if penalties[i] != 1.0 and len(ids):
                ids = torch.as_tensor(ids, dtype=torch.long, device=scores.device).clamp(max=vocab)
                seen[i, ids] = True
        seen = seen[:, :vocab]
        penalty = _per_row(penalties, scores)
        penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
        return torch.where(seen, penalized, scores)

    def warp(self, scores: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
        """Temperature, top-k, top-p, in transformers' order, for sampled rows only."""
        filter_value = float("-inf")
        temps = [p.temperature for p in params]
        if any(t != 1.0 for t in temps):
            scores = scores / _per_row(temps, scores)

        top_ks = [p.top_k for p in params]
        if any(k > 0 for k in top_ks):
            vocab = scores.shape[-1]
            ks = [min(k, vocab) for k in top_ks]
            kth = torch.topk(scores, max(ks), dim=-1).values           # sorted, descending
            col = torch.tensor([max(k - 1, 0) for k in ks], device=scores.device)
            threshold = kth.gather(1, col[:, None])
            off = torch.tensor([k == 0 for k in top_ks], device=scores.device)
            threshold = threshold.masked_fill(off[:, None], float("-inf"))   # nothing is < -inf
            scores = scores.masked_fill(scores < threshold, filter_value)

        top_ps = [p.top_p for p in params]
        if any(p < 1.0 for p in top_ps):
            sorted_logits, sorted_indices = torch.sort(scores, descending=False)
            cumulative_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            # Drop the low tail holding at most 1 - top_p of the mass; rows with top_p = 1 drop nothing.
            cut = _per_row([1 - p if p < 1.0 else -1.0 for p in top_ps], scores)
            sorted_to_remove = cumulative_probs <= cut
            sorted_to_remove[..., -1:] = 0                              # keep at least one token
            to_remove = sorted_to_remove.scatter(1, sorted_indices, sorted_to_remove)
            scores = scores.masked_fill(to_remove, filter_value)
        return scores


def _per_row(values: list[float], like: torch.Tensor) -> float | torch.Tensor:
    """A Python scalar when every row shares the value (bit-identical to transformers on every
    device), else a `[B, 1]` fp32 column."""
    if all(v == values[0] for v in values):
        return values[0]
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]
