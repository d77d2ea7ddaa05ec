"""graphs/attention.py against plain dense attention (written here from the definition, with
explicit K/V repetition per query head), for both formulations: the decode reduction (T == 1)
and the prefill-chunk SDPA path, with scattered blocks, GQA, padding rows and bf16."""
import pytest
import torch

from internvl_aot.graphs.attention import paged_attention, write_kv


def dense_reference(q, keys, values, positions, scale):
    """q [T, H, d] at positions [T]; keys/values [S, kvh, d] in sequence order."""
    h, kvh = q.shape[1], keys.shape[1]
    k = keys.repeat_interleave(h // kvh, dim=1).float()
    v = values.repeat_interleave(h // kvh, dim=1).float()
    scores = torch.einsum("thd,shd->hts", q.float(), k) * scale
    s = keys.shape[0]
    scores = scores.masked_fill(torch.arange(s)[None, None, :] > positions[None, :, None], float("-inf"))
    return torch.einsum("hts,shd->thd", torch.softmax(scores, -1), v)


def make_case(b, t, heads, kv_heads, d, block_size, max_blocks, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_blocks = b * max_blocks + 3
    k_cache = torch.zeros(2, num_blocks, block_size, kv_heads, d, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    perm = torch.randperm(num_blocks - 1, generator=g)[: b * max_blocks] + 1       # block 0 is the sink
    tables = perm.view(b, max_blocks)
    lengths = [int(x) for x in torch.randint(t, max_blocks * block_size + 1, (b,), generator=g)]
    seqs = []
    for i, n in enumerate(lengths):
        keys = torch.randn(n, kv_heads, d, generator=g).to(dtype)
        values = torch.randn(n, kv_heads, d, generator=g).to(dtype)
        slots = tables[i, torch.arange(n) // block_size] * block_size + torch.arange(n) % block_size
        write_kv(k_cache, 1, slots, keys)
        write_kv(v_cache, 1, slots, values)
        seqs.append((keys, values))
    q = torch.randn(b, t, heads, d, generator=g).to(dtype)
    positions = torch.stack([torch.arange(n - t, n) for n in lengths])
    return q, k_cache, v_cache, tables, positions, seqs


@pytest.mark.parametrize("t", [1, 5])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4)])
def test_paged_attention_matches_dense(t, dtype, tol, heads, kv_heads):
    q, kc, vc, tables, positions, seqs = make_case(3, t, heads, kv_heads, 16, 4, 6, dtype)
    out = paged_attention(q, kc, vc, 1, tables, positions, 0.25)
    assert out.shape == q.shape and out.dtype == dtype
    for i, (keys, values) in enumerate(seqs):
        ref = dense_reference(q[i], keys, values, positions[i], 0.25)
        torch.testing.assert_close(out[i].float(), ref, atol=tol, rtol=tol)


def test_decode_ignores_blocks_past_the_position():
    """Garbage in blocks beyond a sequence's position (other sequences' data, stale values) must
    not leak in: the result depends on keys 0..position only."""
    q, kc, vc, tables, positions, seqs = make_case(2, 1, 4, 2, 8, 4, 5, torch.float32, seed=3)
    before = paged_attention(q, kc, vc, 1, tables, positions, 0.3)
    n = int(positions[0, 0]) + 1
    tail = tables[0, (n + 3) // 4:]
    if len(tail):
        kc[1, tail] = 1e4
        vc[1, tail] = -1e4
    # the same block's unused slots too
    used_in_last = n % 4
    if used_in_last:
        kc[1, tables[0, n // 4], used_in_last:] = 1e4
    after = paged_attention(q, kc, vc, 1, tables, positions, 0.3)
    torch.testing.assert_close(after, before)
