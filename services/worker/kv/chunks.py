"""KV chunks: the unit the lower tiers (host, disk, shared) store and load. Pure: torch and
safetensors only.

A sequence's KV is cut into chunks of `CHUNK_TOKENS` positions; the positions after the last full
chunk form one shorter tail chunk. A chunk's key chains a digest of its token ids with its
parent's key (the chunk before it), starting from the model fingerprint, so one key names a whole
prefix of a token sequence under one model: any worker that computed the same prefix, for any
conversation, writes the same keys. A partial history is reusable chunk by chunk, and a system
prompt computed on worker A is found by worker B.

A stored chunk is a safetensors file: one tensor `kv` `[layers, 2, kv_heads, n, head_dim]`, and
metadata naming the fingerprint, the positions and the chunk's own token ids. A chunk whose
metadata, shape or dtype does not match what was asked for is rejected (never loaded): keys are
128-bit digests, but a corrupt, truncated or foreign entry must never become KV.
"""

import array
import hashlib
import json
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from services.worker.kv.store import KVLayout

CHUNK_TOKENS = 64


class ChunkRejected(ValueError):
    """Stored bytes that are not the chunk asked for (corrupt, truncated, other model)."""


@dataclass(frozen=True)
class ChunkRef:
    key: str  # hex digest: the prefix token_ids[:end] under this model
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


def fingerprint_key(fp: dict) -> bytes:
    """The chain's root: chunks of different models, revisions, dtypes or KV layouts never share
    a key."""
    return hashlib.blake2b(json.dumps(fp, sort_keys=True).encode(), digest_size=16).digest()


def _digest(parent: bytes, ids: Sequence[int], tail: bool) -> bytes:
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(b"t" if tail else b"f")
    h.update(_le_int64(ids))
    return h.digest()


def _le_int64(ids: Sequence[int]) -> bytes:
    """The ids as little-endian int64s: the same key on every machine."""
    packed = array.array("q", ids)
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()


def chunk_refs(root: bytes, token_ids: Sequence[int], limit: int, tail: bool = True) -> list[ChunkRef]:
    """The chunks covering positions 0..limit of `token_ids`: every full chunk, then (with `tail`)
    the tail chunk of the positions after the last one."""
    refs, parent = [], root
    full_end = limit - limit % CHUNK_TOKENS
    for start in range(0, full_end, CHUNK_TOKENS):
        parent = _digest(parent, token_ids[start:start + CHUNK_TOKENS], tail=False)
        refs.append(ChunkRef(parent.hex(), start, start + CHUNK_TOKENS))
    if tail and full_end < limit:
        refs.append(ChunkRef(_digest(parent, token_ids[full_end:limit], tail=True).hex(), full_end, limit))
    return refs


def tail_candidates(parent: bytes, token_ids: Sequence[int], start: int, limit: int) -> list[ChunkRef]:
    """Tail chunks that may follow the full chunks ending at `start`, longest first: the sequence
    stored may have ended anywhere up to `limit` (a stateless request does not know where its
    previous turn ended). `parent`: the key of the full chunk ending at `start` (the caller has
    it from chunk_refs), or the root at 0."""
    last = min(limit, start + CHUNK_TOKENS - 1)
    return [ChunkRef(_digest(parent, token_ids[start:end], tail=True).hex(), start, end)
            for end in range(last, start, -1)]


def parent_key(root: bytes, full: list[ChunkRef]) -> bytes:
    """The chain's key after the full chunks `full` (the root if there are none)."""
    return bytes.fromhex(full[-1].key) if full else root


def chunk_kv(kv: torch.Tensor, ref: ChunkRef) -> torch.Tensor:
    """A contiguous CPU copy of the chunk's positions; kv: `[layers, 2, kv_heads, capacity,
    head_dim]` -> `[layers, 2, kv_heads, n, head_dim]`."""
    part = kv[:, :, :, ref.start:ref.end]
    return torch.empty(part.shape, dtype=part.dtype, device="cpu").copy_(part)


def encode(ref: ChunkRef, data: torch.Tensor, fp: dict, ids: Sequence[int]) -> bytes:
    meta = {"fingerprint": json.dumps(fp, sort_keys=True), "start": str(ref.start), "end": str(ref.end),
            "token_ids": json.dumps(list(ids))}
    return st_save({"kv": data}, metadata=meta)


def decode(raw: bytes, ref: ChunkRef, fp: dict, ids: Sequence[int], layout: KVLayout) -> torch.Tensor:
    """The chunk's KV `[layers, 2, kv_heads, n, head_dim]`, or ChunkRejected."""
    meta = read_metadata(raw)
    if meta.get("fingerprint") != json.dumps(fp, sort_keys=True):
        raise ChunkRejected("model fingerprint differs")
    if meta.get("start") != str(ref.start) or meta.get("end") != str(ref.end) \
            or meta.get("token_ids") != json.dumps(list(ids)):
        raise ChunkRejected("positions or token ids differ from the key's")
    try:
        data = st_load(raw)["kv"]
    except (SafetensorError, KeyError) as exc:
        raise ChunkRejected(f"unreadable tensor: {exc}") from exc
    expected = (layout.num_layers, 2, layout.num_kv_heads, ref.num_tokens, layout.head_dim)
    if tuple(data.shape) != expected or data.dtype != layout.dtype:
        raise ChunkRejected(f"tensor {tuple(data.shape)} {data.dtype}, expected {expected} {layout.dtype}")
    return data


def read_metadata(raw: bytes) -> dict:
    """A safetensors file's `__metadata__`, or ChunkRejected."""
    try:
        (size,) = struct.unpack("<Q", raw[:8])
        if size > len(raw) - 8:
            raise ChunkRejected("truncated header")
        meta = json.loads(raw[8:8 + size]).get("__metadata__")
    except (struct.error, ValueError, AttributeError) as exc:
        raise ChunkRejected(f"unreadable header: {exc}") from exc
    if not isinstance(meta, dict):
        raise ChunkRejected("no metadata")
    return meta
