"""Attention over packed, variable-length sequences that reads and writes the KV store in place.

A step's new tokens from every scheduled sequence are packed into one row `[1, T]`, so the
projections and MLP run as one batched matmul. Attention is then done per sequence: its new
K/V are written into its own preallocated buffer at their positions, and its queries attend to
that buffer's valid prefix through a view (no copy, no padding). A sequence's result does not
depend on what else is in the step.

The step's segments reach this function through a context variable set by the runner, not
through the model's kwargs: some models (Falcon, StableLM) do not pass extra kwargs down to
their attention. What each layer's attention asks for arrives as the kwargs transformers'
own attention functions take (`scaling`, `sliding_window`, `softcap`, `s_aux`), except a
chunked window (Llama-4), which transformers expresses only as a mask: it comes from the
model's `AttentionSpec` (model_support.py).
"""

from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from services.worker.kv.store import SequenceKV
from services.worker.model.model_support import AttentionSpec

ATTN_IMPLEMENTATION = "kvcache_packed"


@dataclass(frozen=True)
class Segment:
    kv: SequenceKV
    start: int      # position of the first new token (KV already valid before it)
    num_new: int    # new tokens of this sequence in the packed row
    offset: int     # where they sit in the packed row


@dataclass(frozen=True)
class Step:
    segments: list[Segment]
    spec: AttentionSpec  # the per-layer chunk sizes and temperature tuning
    long_rope: torch.Tensor | None = None  # [T] bool: token takes LongRoPE's long factors


_STEP: ContextVar[Step | None] = ContextVar("kvcache_step", default=None)


def current_step() -> Step:
    step = _STEP.get()
    if step is None:
        raise RuntimeError(f"{ATTN_IMPLEMENTATION} attention called outside a runner step")
    return step


def run_step(step: Step, fn, *args, **kwargs):
    """Call `fn` with `step` visible to the attention of every layer it runs."""
    token = _STEP.set(step)
    try:
        return fn(*args, **kwargs)
    finally:
        _STEP.reset(token)


@dataclass(frozen=True)
class Window:
    """Which keys a query at position p sees, besides causality: keys > p - sliding (a sliding
    window of `sliding` positions, itself included), or keys in p's chunk of `chunk` positions."""
    sliding: int | None = None
    chunk: int | None = None

    @property
    def limited(self) -> bool:
        return self.sliding is not None or self.chunk is not None

    def first_key(self, pos: int) -> int:
        if self.sliding is not None:
            return max(0, pos - self.sliding + 1)
        if self.chunk is not None:
            return pos // self.chunk * self.chunk
        return 0


def packed_kv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        sliding_window=None, softcap=None, s_aux=None, **kwargs):
    # query: [1, H, T, D]; key: [1, H_kv, T, D]; value: [1, H_kv, T, Dv] for the T packed new tokens.
    step = current_step()
    layer = module.layer_idx
    window = Window(sliding_window, step.spec.chunk_sizes.get(layer))
    limited, tuning = window.limited, step.spec.temperature_tuning.get(layer)
    gqa = key.shape[1] != query.shape[1]
    # [1, H, T, Dv], laid out as [1, T, H, Dv] like query: the result's transpose is contiguous
    out = query.new_empty(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]).transpose(1, 2)
    exact = softcap is not None or s_aux is not None
    for seg in step.segments:
        rows = slice(seg.offset, seg.offset + seg.num_new)
        keys, values = seg.kv.write(layer, seg.start, key[0, :, rows].transpose(0, 1),
                                    value[0, :, rows].transpose(0, 1))  # [L, H_kv, D], [L, H_kv, Dv]
        first = window.first_key(seg.start) if limited else 0
        if first:
            keys, values = keys[first:], values[first:]
        k = keys.permute(1, 0, 2).unsqueeze(0)    # [1, H_kv, L', D]
        v = values.permute(1, 0, 2).unsqueeze(0)  # [1, H_kv, L', Dv]
        mask = _mask(seg, first, window, query.device)
        q = query[:, :, rows]
        if tuning is not None:
            q = _tuned(q, seg, *tuning)
        if exact:
            out[:, :, rows] = _eager(q, k, v, mask, scaling, softcap, s_aux)
        else:
            out[:, :, rows] = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and seg.num_new > 1, scale=scaling,
                enable_gqa=gqa)
    return out.transpose(1, 2), None  # [1, T, H, Dv]


def _mask(seg: Segment, first: int, window: Window, device: torch.device) -> torch.Tensor | None:
    """`[n, L']` bool: new token i (position start + i) sees keys first..start + i that its window
    allows. None when the key range alone is the mask: a single query (its range was sliced to
    its window), or a plain causal prefill from position 0 (SDPA's `is_causal`)."""
    if seg.num_new == 1:
        return None
    if seg.start == 0 and not window.limited:
        return None
    end = seg.start + seg.num_new
    query_pos = torch.arange(seg.start, end, device=device)[:, None]
    key_pos = torch.arange(first, end, device=device)[None, :]
    allowed = key_pos <= query_pos
    if window.sliding is not None:
        allowed &= key_pos > query_pos - window.sliding
    if window.chunk is not None:
        allowed &= key_pos // window.chunk == query_pos // window.chunk
    return allowed


def _tuned(q: torch.Tensor, seg: Segment, floor_scale: int, attn_scale: float) -> torch.Tensor:
    """Llama-4's attention temperature tuning at the segment's real positions, computed as
    transformers does. q: [1, H, n, D]."""
    positions = torch.arange(seg.start, seg.start + seg.num_new, device=q.device, dtype=torch.float32)
    scales = torch.log1p(torch.floor((positions + 1.0) / floor_scale)) * attn_scale + 1.0  # [n]
    return (q * scales[None, None, :, None]).to(q.dtype)


def _eager(q, k, v, mask, scaling, softcap, sinks) -> torch.Tensor:
    """transformers' eager attention with soft-capping (Gemma-2) and sinks (gpt-oss), which SDPA
    has no argument for. q: [1, H, n, D]; k: [1, H_kv, L, D]; v: [1, H_kv, L, Dv] -> [1, H, n, Dv]."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(2, 3)) * scale  # [1, H, n, L]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is None:
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    else:  # a per-head sink logit joins the softmax, then is dropped
        sink = sinks.reshape(1, -1, 1, 1).expand(1, -1, scores.shape[2], 1).to(scores.dtype)
        combined = torch.cat([scores, sink], dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        probs = F.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)


AttentionInterface.register(ATTN_IMPLEMENTATION, packed_kv_attention)
