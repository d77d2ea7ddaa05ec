import math

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from internvl_aot.runtime.sampler import Sampler, SamplingParams, make_generator

V = 1000


def hf_processors(p: SamplingParams) -> LogitsProcessorList:
    """What transformers' generate builds for these settings (see GenerationMixin._get_logits_processor)."""
    procs = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(float(p.repetition_penalty)))
    if not p.greedy:
        if p.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(float(p.temperature)))
        if p.top_k:
            procs.append(TopKLogitsWarper(p.top_k))
        if p.top_p < 1.0:
            procs.append(TopPLogitsWarper(p.top_p))
    return procs


def hf_process(logits_row, history_row, p):
    ids = torch.tensor([history_row], dtype=torch.long)
    return hf_processors(p)(ids, logits_row[None].clone())[0]


SETTINGS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.0, repetition_penalty=1.3),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.0, top_k=50),
    SamplingParams(temperature=1.0, top_p=0.9),
    SamplingParams(temperature=0.6, top_k=20, top_p=0.8),
    SamplingParams(temperature=1.3, top_k=5, top_p=0.5, repetition_penalty=1.2),
    SamplingParams(temperature=0.8, repetition_penalty=0.7),
    SamplingParams(temperature=1.0, top_k=V + 10),                 # top_k larger than the vocabulary
    SamplingParams(temperature=0.9, top_p=0.01),                    # keeps at least one token
]


def random_inputs(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, V, generator=g) * 3
    history = [torch.randint(0, V, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
               for _ in range(batch)]
    return logits, history


@pytest.mark.parametrize("p", SETTINGS, ids=repr)
def test_processed_logits_equal_transformers_uniform_batch(p):
    logits, history = random_inputs(4, seed=1)
    params = [p] * 4
    ours = Sampler().process(logits, params, history)
    for i in range(4):
        assert torch.equal(ours[i], hf_process(logits[i], history[i], p)), f"row {i}"


def test_processed_logits_equal_transformers_mixed_batch():
    # Every row with its own settings, in one batch: still row-for-row what transformers computes.
    logits, history = random_inputs(len(SETTINGS), seed=2)
    ours = Sampler().process(logits, SETTINGS, history)
    for i, p in enumerate(SETTINGS):
        assert torch.equal(ours[i], hf_process(logits[i], history[i], p)), f"row {i}: {p}"


def test_repetition_penalty_details():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    p = SamplingParams(repetition_penalty=2.0)
    # Repeated ids count once; ids beyond the logits' width are ignored.
    out = Sampler().process(logits, [p], [[0, 1, 1, 7]])
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]
    with pytest.raises(ValueError):
        Sampler().process(logits, [p], None)


def test_greedy_is_argmax_first_on_ties():
    logits, _ = random_inputs(6, seed=3)
    logits[2, 10] = logits[2, 500] = 100.0
    tokens = Sampler()(logits, [SamplingParams()] * 6)
    assert tokens.dtype == torch.long and tokens.shape == (6,)
    assert torch.equal(tokens, logits.argmax(dim=-1))
    assert tokens[2] == 10


def test_greedy_applies_repetition_penalty_like_transformers():
    logits = torch.tensor([[5.0, 4.0, 0.0]])
    p = SamplingParams(repetition_penalty=2.0)
    assert Sampler()(logits, [p], [[0]]).item() == 1                # 5/2 < 4


def test_matches_transformers_sampling_with_manual_seed():
    # transformers: torch.manual_seed(s); processors; softmax; multinomial, batch 1, step after step.
    p = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.1, seed=1234)
    steps = [random_inputs(1, seed=10 + t) for t in range(8)]
    torch.manual_seed(p.seed)
    expected = []
    for logits, history in steps:
        scores = hf_process(logits[0], history[0], p)
        expected.append(torch.multinomial(torch.softmax(scores[None], -1), 1).item())
    torch.manual_seed(999)                                          # our sampler must not use the global stream
    gen = make_generator(p)
    got = [Sampler()(logits, [p], history, [gen]).item() for logits, history in steps]
    assert got == expected


def test_same_seed_same_tokens_regardless_of_batch_position():
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=7)
    other = SamplingParams(temperature=1.5, seed=8)
    target_logits = [random_inputs(1, seed=20 + t)[0][0] for t in range(10)]
    noise = [random_inputs(5, seed=40 + t)[0] for t in range(10)]
    sampler = Sampler()

    def run(position, batch):
        gens = [make_generator(p if j == position else other) for j in range(batch)]
        params = [p if j == position else other for j in range(batch)]
        out = []
        for t in range(10):
            logits = noise[t][:batch].clone()
            logits[position] = target_logits[t]
            out.append(sampler(logits, params, None, gens)[position].item())
        return out

    alone = run(0, 1)
    assert run(3, 5) == alone
    assert run(1, 2) == alone
    assert len(set(alone)) > 1                                      # it really sampled


def test_unseeded_generators_differ():
    p = SamplingParams(temperature=1.0)
    a, b = make_generator(p), make_generator(p)
    assert a.initial_seed() != b.initial_seed()
    assert make_generator(SamplingParams()) is None


def test_padded_vocab_columns_never_win():
    logits, _ = random_inputs(4, seed=5)
    logits[:, 990:] = 1e4                                           # padding columns with huge scores
    sampler = Sampler(vocab_limit=990)
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=1),
              SamplingParams(temperature=2.0, top_k=V, seed=2), SamplingParams(temperature=5.0, top_p=1.0, seed=3)]
    gens = [make_generator(p) for p in params]
    for _ in range(50):
        assert (sampler(logits, params, None, gens) < 990).all()
    processed = sampler.process(logits, params)
    assert torch.isneginf(processed[:, 990:]).all()


def chi_square(counts, probs):
    n = sum(counts)
    return sum((c - n * q) ** 2 / (n * q) for c, q in zip(counts, probs) if q > 0)


@pytest.mark.parametrize("p,expected", [
    (SamplingParams(temperature=1.0, seed=0), [0.5, 0.3, 0.15, 0.05]),
    # temperature 2: probabilities proportional to sqrt(p)
    (SamplingParams(temperature=2.0, seed=1),
     [x / sum(math.sqrt(q) for q in (0.5, 0.3, 0.15, 0.05)) for x in
      (math.sqrt(0.5), math.sqrt(0.3), math.sqrt(0.15), math.sqrt(0.05))]),
    # top-p 0.7: the low tail (0.05 + 0.15 = 0.2 <= 0.3) goes; 0.5 and 0.3 renormalise
    (SamplingParams(temperature=1.0, top_p=0.7, seed=2), [0.625, 0.375, 0.0, 0.0]),
    # top-k 3
    (SamplingParams(temperature=1.0, top_k=3, seed=3), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),
])
def test_sampling_frequencies_match_distribution(p, expected):
    n = 8000
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).expand(n, 4)
    gen = make_generator(p)
    tokens = Sampler()(logits, [p] * n, None, [gen] * n)
    counts = torch.bincount(tokens, minlength=4).tolist()
    for c, q in zip(counts, expected):
        if q == 0:
            assert c == 0
    # df <= 3; 16.3 is the 0.1% critical value of chi-square with 3 degrees of freedom.
    assert chi_square(counts, expected) < 16.3, (counts, expected)


def test_sampling_params_validation():
    for bad in (dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
                dict(repetition_penalty=0.0), dict(max_new_tokens=0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    p = SamplingParams(stop_token_ids=[3, 4])
    assert p.stop_token_ids == (3, 4) and p.greedy
