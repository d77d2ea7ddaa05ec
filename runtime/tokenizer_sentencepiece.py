"""The SentencePiece backend (tokenizer.model): the sentencepiece library itself, with Llama's
non-legacy dummy-prefix rule reproduced by editing the model proto."""
from __future__ import annotations

from pathlib import Path

from .tokenizer_files import SPIECE_UNDERLINE, _Config


# --------------------------------------------------------------------------------------------------------------
# SentencePiece backend


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _proto_fields(buf: bytes):
    """Yields (field_number, wire_type, raw_bytes_of_the_whole_field, payload) of a protobuf message."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
            payload = None
        elif wire == 1:
            pos += 8
            payload = None
        elif wire == 2:
            length, pos = _varint(buf, pos)
            payload = buf[pos : pos + length]
            pos += length
        elif wire == 5:
            pos += 4
            payload = None
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, buf[start:pos], payload


def _without_dummy_prefix(model_proto: bytes) -> bytes:
    """ModelProto with normalizer_spec.add_dummy_prefix = false (what transformers' non-legacy Llama mode loads).

    Edits the wire format directly (ModelProto.normalizer_spec is field 3, NormalizerSpec.add_dummy_prefix is
    field 3) so that the runtime does not need protobuf.
    """
    out = bytearray()
    found = False
    for field, wire, raw, payload in _proto_fields(model_proto):
        if field == 3 and wire == 2:
            found = True
            spec = b"".join(r for f, w, r, _ in _proto_fields(payload) if f != 3)
            spec += bytes([3 << 3 | 0, 0])
            out += bytes([3 << 3 | 2]) + _encode_varint(len(spec)) + spec
        else:
            out += raw
    if not found:
        spec = bytes([3 << 3 | 0, 0])
        out += bytes([3 << 3 | 2]) + _encode_varint(len(spec)) + spec
    return bytes(out)


class _SentencePieceBackend:
    """transformers 4.x slow-tokenizer semantics on top of the sentencepiece library."""

    def __init__(self, model_file: Path, cfg: _Config):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        tc = cfg.tokenizer_config
        tokenizer_class = tc.get("tokenizer_class") or ""
        # InternLM2Tokenizer always encodes each text segment with the model as is (the "legacy" behaviour);
        # LlamaTokenizer reads `legacy` from its config and defaults to True.
        self.internlm2 = "InternLM2" in tokenizer_class
        self.legacy = True if self.internlm2 else bool(tc.get("legacy", True))
        aps = tc.get("add_prefix_space")
        self.add_prefix_space = True if aps is None else bool(aps)
        self.unk_token = cfg.named.get("unk_token", "<unk>")
        if not self.legacy:
            self.sp_nodummy = spm.SentencePieceProcessor()
            self.sp_nodummy.LoadFromSerializedProto(_without_dummy_prefix(self.sp.serialized_model_proto()))
            self.unk_token_length = len(self.sp_nodummy.encode(self.unk_token))
            self.underline_id = self.sp.piece_to_id(SPIECE_UNDERLINE)
            if self.sp.id_to_piece(self.underline_id) != SPIECE_UNDERLINE:
                self.underline_id = None
        self.base_size = self.sp.get_piece_size()

    def piece_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        if i < self.base_size and self.sp.id_to_piece(i) == piece:
            return i
        return None

    def id_to_piece(self, i: int) -> str | None:
        return self.sp.id_to_piece(i) if 0 <= i < self.base_size else None

    def encode_segment(self, text: str) -> list[int]:
        if self.legacy:
            return self.sp.encode(text)
        if not text.startswith((SPIECE_UNDERLINE, " ")):
            return self.sp_nodummy.encode(text)
        # transformers' trick to keep a leading space without the dummy prefix: encode "<unk>" + text and
        # drop the pieces of "<unk>".
        ids = self.sp_nodummy.encode(self.unk_token + text)
        return ids[self.unk_token_length :] if len(ids) >= self.unk_token_length else ids

    def decode_run(self, ids: list[int]) -> str:
        return self.sp.decode(ids)
