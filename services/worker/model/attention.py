"""Attention over packed, variable-length sequences that reads and writes the KV store in place.

A step's new tokens from every scheduled sequence are packed into one row `[1, T]`, so the
projections and MLP run as one batched matmul. Attention is then done per sequence: its new
K/V are written into its own preallocated buffer at their positions, and its queries attend to
that buffer's valid prefix through a view (no copy, no padding). A sequence's result does not
depend on what else is in the step.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from services.worker.kv_store import SequenceKV

ATTN_IMPLEMENTATION = "kvcache_packed"


@dataclass(frozen=True)
class Segment:
    kv: SequenceKV
    start: int      # position of the first new token (KV already valid before it)
    num_new: int    # new tokens of this sequence in the packed row
    offset: int     # where they sit in the packed row


def packed_kv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        kv_segments: list[Segment] | None = None, **kwargs):
    # query: [1, H, T, D]; key, value: [1, H_kv, T, D] for the T packed new tokens.
    if kv_segments is None:
        raise RuntimeError(f"{ATTN_IMPLEMENTATION} attention needs kv_segments")
    layer = module.layer_idx
    out = torch.empty_like(query)
    gqa = key.shape[1] != query.shape[1]
    for seg in kv_segments:
        rows = slice(seg.offset, seg.offset + seg.num_new)
        keys, values = seg.kv.write(layer, seg.start, key[0, :, rows].transpose(0, 1),
                                    value[0, :, rows].transpose(0, 1))  # [L, H_kv, D] each
        k = keys.permute(1, 0, 2).unsqueeze(0)    # [1, H_kv, L, D]
        v = values.permute(1, 0, 2).unsqueeze(0)
        out[:, :, rows] = F.scaled_dot_product_attention(
            query[:, :, rows], k, v, attn_mask=_causal_mask(seg, query.device),
            is_causal=seg.start == 0 and seg.num_new > 1, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2), None  # [1, T, H, D]


def _causal_mask(seg: Segment, device: torch.device) -> torch.Tensor | None:
    """New token i (at position start + i) sees positions 0..start + i. None when SDPA needs no
    mask: a single query sees everything, and start == 0 is plain `is_causal`."""
    if seg.num_new == 1 or seg.start == 0:
        return None
    total = seg.start + seg.num_new
    query_pos = torch.arange(seg.start, total, device=device)[:, None]
    return torch.arange(total, device=device)[None, :] <= query_pos  # [n, L] bool


AttentionInterface.register(ATTN_IMPLEMENTATION, packed_kv_attention)
