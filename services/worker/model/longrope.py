"""LongRoPE (Phi-3-128k, Phi-3.5, Phi-4-mini) with its factors chosen per sequence, not per batch.

transformers picks the short or the long factors from the largest position in the forward pass,
so in a packed step a short sequence beside a long one would change its tokens. Here every token
of a sequence takes what transformers' `generate` on that sequence alone gives it: the long
factors once the sequence (all its known tokens) is longer than the original window, the short
ones before. `generate` recomputes the whole sequence with the long factors at the step that
crosses the window (Phi-3's `prepare_inputs_for_generation` drops its cache there); so does the
engine (`RopeRegime.must_recompute`).

So a sequence's KV of n positions was always computed in the regime of n: longer than the
original window means all long, otherwise all short. Its length alone tells which, which is what
lets handoff and prefix copies carry no extra state.
"""

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from services.worker.model.attention import current_step


@dataclass(frozen=True)
class RopeRegime:
    original: int  # LongRoPE's original_max_position_embeddings

    def is_long(self, num_tokens: int) -> bool:
        return num_tokens > self.original

    def must_recompute(self, kv_tokens: int, sequence_tokens: int) -> bool:
        """Whether KV of `kv_tokens` positions is wrong for a sequence now `sequence_tokens` long."""
        return kv_tokens > 0 and self.is_long(kv_tokens) != self.is_long(sequence_tokens)

    def token_flags(self, sequence_tokens: list[int], device: torch.device) -> torch.Tensor:
        """[T] bool: each token, of a sequence of that many known tokens, takes the long factors."""
        return torch.tensor([n > self.original for n in sequence_tokens], device=device)


def install(model: PreTrainedModel, original: int) -> RopeRegime:
    """Make every LongRoPE rotary embedding of `model` choose its factors per token."""
    rotaries = [m for m in model.modules() if getattr(m, "rope_type", None) == "longrope"]
    if not rotaries:
        raise RuntimeError("the config asks for LongRoPE but the model has no LongRoPE rotary embedding")
    for rotary in rotaries:
        _wrap(rotary, original)
    return RopeRegime(original)


def _wrap(rotary: torch.nn.Module, original: int) -> None:
    raw = type(rotary).forward.__wrapped__  # the forward without transformers' batch-wide choice
    device = rotary.inv_freq.device
    long_inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](rotary.config, device, seq_len=original + 1)
    factors = {False: rotary.original_inv_freq.clone(), True: long_inv_freq.to(device)}

    def with_factors(x, position_ids, long: bool):
        rotary.inv_freq.copy_(factors[long])
        return raw(rotary, x, position_ids)

    def forward(x, position_ids):
        flags = current_step().long_rope  # [T]
        if flags is None or not bool(flags.any()):
            return with_factors(x, position_ids, False)
        if bool(flags.all()):
            return with_factors(x, position_ids, True)
        cos_short, sin_short = with_factors(x, position_ids, False)  # [1, T, D] each
        cos_long, sin_long = with_factors(x, position_ids, True)
        pick = flags[None, :, None]
        return torch.where(pick, cos_long, cos_short), torch.where(pick, sin_long, sin_short)

    rotary.forward = forward
