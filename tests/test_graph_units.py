"""Pieces of graphs/ checked against code we did not write: InternVL's original pixel shuffle
(transcribed from OpenGVLab's modeling_internvl_chat.py) and transformers' RoPE initialisers."""
import pytest
import torch

from internvl_aot.graphs.projector import pixel_shuffle
from internvl_aot.graphs.rotary import rope_inv_freq


def original_pixel_shuffle(x, scale_factor=0.5, ps_version="v2"):
    # OpenGVLab InternVLChatModel.pixel_shuffle, verbatim but for the warning.
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    if ps_version != "v1":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_pixel_shuffle_matches_original(version):
    x = torch.randn(2, 32, 32, 24)
    assert torch.equal(pixel_shuffle(x, 0.5, version), original_pixel_shuffle(x, 0.5, version))


def test_pixel_shuffle_v1_is_the_transpose_of_v2():
    x = torch.randn(1, 32, 32, 8)
    assert torch.equal(pixel_shuffle(x, 0.5, "v1"), pixel_shuffle(x, 0.5, "v2").transpose(1, 2))
    with pytest.raises(ValueError, match="v3"):
        pixel_shuffle(x, 0.5, "v3")


@pytest.mark.parametrize("kind,seq_len", [("linear", 100), ("dynamic", 100), ("dynamic", 9000)])
def test_rope_scaling_matches_transformers(kind, seq_len):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    head_dim, theta, max_pos, factor = 64, 10000.0, 4096, 2.0
    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=max_pos,
                      rope_parameters={"rope_type": kind, "rope_theta": theta, "factor": factor})
    fn = ROPE_INIT_FUNCTIONS[kind]
    ref, _ = fn(cfg, "cpu", seq_len) if kind == "dynamic" else fn(cfg, "cpu")
    ours = rope_inv_freq(head_dim, theta, {"type": kind, "factor": factor}, max_pos, seq_len)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)
    if kind == "dynamic" and seq_len <= max_pos:          # below the limit dynamic NTK changes nothing
        torch.testing.assert_close(ours, rope_inv_freq(head_dim, theta, None, max_pos, seq_len))
