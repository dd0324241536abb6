"""The KV handoff wire format: one sequence's KV as a safetensors file, streamed.

`[8-byte little-endian header length][JSON header][raw tensor bytes]`, the safetensors layout:
tensors `layers.<l>.key` and `layers.<l>.value`, each `[kv_heads, n, head_dim]`, in that order,
so the data is one `[layers, 2, kv_heads, n, head_dim]` block. The header's `__metadata__` holds
the cached token ids and the model fingerprint. The sender streams each head's positions straight
from its KV buffer (contiguous rows: no intermediate copy); the receiver checks the header before
it reads any data. Pure: torch only, no HTTP.
"""

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from services.worker.kv.store import KVLayout

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_MAX_HEADER_BYTES = 64 * 2**20  # token ids of a long sequence are the bulk of it


class KVFormatError(ValueError):
    """The bytes are not a KV export this worker can use."""


def fingerprint(model_name: str, layout: KVLayout, revision: str | None = None) -> dict:
    """What must match for KV to be interchangeable between two workers (and the KV tiers):
    the model's name and weights revision, dtype and KV layout."""
    return {"model": model_name, "revision": revision, "dtype": _DTYPES[layout.dtype],
            "layers": layout.num_layers, "kv_heads": layout.num_kv_heads, "head_dim": layout.head_dim}


@dataclass(frozen=True)
class KVHeader:
    token_ids: list[int]
    fingerprint: dict
    data_bytes: int


def encode_header(token_ids: list[int], fp: dict, layout: KVLayout) -> bytes:
    n, itemsize = len(token_ids), torch.empty((), dtype=layout.dtype).element_size()
    tensor_bytes = layout.num_kv_heads * n * layout.head_dim * itemsize
    tensors, offset = {}, 0
    for layer in range(layout.num_layers):
        for kind in ("key", "value"):
            tensors[f"layers.{layer}.{kind}"] = {
                "dtype": fp["dtype"], "shape": [layout.num_kv_heads, n, layout.head_dim],
                "data_offsets": [offset, offset + tensor_bytes]}
            offset += tensor_bytes
    meta = {"token_ids": json.dumps(token_ids), "fingerprint": json.dumps(fp, sort_keys=True)}
    header = json.dumps({"__metadata__": meta, **tensors}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # safetensors aligns the data to 8 bytes
    return struct.pack("<Q", len(header)) + header


def data_pieces(kv: torch.Tensor, num_tokens: int) -> Iterator[memoryview]:
    """The raw bytes of `kv[:, :, :, :num_tokens]` (kv: `[layers, 2, kv_heads, capacity,
    head_dim]`) in the header's order: one piece per (layer, key/value, head), each a view of
    contiguous rows of the buffer."""
    layers, _, heads = kv.shape[:3]
    for layer in range(layers):
        for kind in range(2):
            for head in range(heads):
                rows = kv[layer, kind, head, :num_tokens]  # [n, head_dim], contiguous
                if rows.device.type != "cpu":
                    rows = rows.cpu()
                yield memoryview(rows.view(torch.uint8).numpy()).cast("B")


def header_length(prefix: bytes) -> int | None:
    """The full header's size in bytes (8 + JSON), once at least 8 bytes are known."""
    if len(prefix) < 8:
        return None
    (size,) = struct.unpack("<Q", prefix[:8])
    if size > _MAX_HEADER_BYTES:
        raise KVFormatError(f"header of {size} bytes is too large")
    return 8 + size


def parse_header(raw: bytes) -> KVHeader:
    try:
        header = json.loads(raw[8:])
        meta = header.pop("__metadata__")
        token_ids = json.loads(meta["token_ids"])
        fp = json.loads(meta["fingerprint"])
        data_bytes = max(t["data_offsets"][1] for t in header.values())
    except (ValueError, KeyError, TypeError) as exc:
        raise KVFormatError(f"unreadable KV header: {exc}") from exc
    if not isinstance(token_ids, list) or not all(isinstance(t, int) for t in token_ids):
        raise KVFormatError("token_ids must be a list of integers")
    return KVHeader(token_ids=token_ids, fingerprint=fp, data_bytes=data_bytes)


def expected_data_bytes(layout: KVLayout, num_tokens: int) -> int:
    return layout.bytes_per_token * num_tokens


def as_kv(data: bytearray, layout: KVLayout, num_tokens: int) -> torch.Tensor:
    """The received bytes as `[layers, 2, kv_heads, n, head_dim]` (a view, no copy)."""
    flat = torch.frombuffer(data, dtype=layout.dtype)
    return flat.view(layout.num_layers, 2, layout.num_kv_heads, num_tokens, layout.head_dim)
