"""Runs one packed forward pass over the scheduled sequences' new tokens."""

from dataclasses import dataclass

import torch

from services.worker.kv.store import SequenceKV
from services.worker.model.attention import Segment, Step, run_step
from services.worker.model.loader import LoadedModel


@dataclass(frozen=True)
class StepInput:
    kv: SequenceKV
    token_ids: list[int]   # new tokens, at positions kv.num_tokens ...
    sample: bool           # return logits at the last new token
    sequence_tokens: int = 0  # all the sequence's known tokens (LongRoPE picks its factors by it)
    all_logits: bool = False  # return logits at every new token (prompt logprobs), the last one included

    @property
    def num_logit_rows(self) -> int:
        return len(self.token_ids) if self.all_logits else int(self.sample)


class ModelRunner:
    def __init__(self, loaded: LoadedModel):
        self.model = loaded.model
        self.device = loaded.layout.device
        self.spec = loaded.spec
        self.rope_regime = loaded.rope_regime
        self.suppress_bias = _suppress_bias(loaded) if loaded.suppressed_ids else None

    @torch.inference_mode()
    def forward(self, inputs: list[StepInput]) -> torch.Tensor:
        """Writes every input's K/V into its buffer (callers advance kv.num_tokens) and returns
        the model's float32 logits `[sum of num_logit_rows, vocab]`, in order (raw: `suppress`
        applies the model's never-sampled ids)."""
        segments, ids, positions, keep = [], [], [], []
        offset = 0
        for item in inputs:
            n, start = len(item.token_ids), item.kv.num_tokens
            segments.append(Segment(item.kv, start, n, offset))
            ids.extend(item.token_ids)
            positions.extend(range(start, start + n))
            if item.all_logits:
                keep.extend(range(offset, offset + n))
            elif item.sample:
                keep.append(offset + n - 1)
            offset += n
        input_ids = torch.tensor([ids], device=self.device)          # [1, T]
        position_ids = torch.tensor([positions], device=self.device)  # [1, T]
        # Only the sampled positions go through the LM head (it is the largest matmul).
        logits_to_keep = torch.tensor(keep or [offset - 1], device=self.device)
        self.spec.check_step(offset)
        step = Step(segments, self.spec, self._long_rope(inputs))
        out = run_step(step, self.model, input_ids=input_ids, position_ids=position_ids, use_cache=False,
                       logits_to_keep=logits_to_keep)
        logits = out.logits[0].float()  # [len(keep), vocab]
        return logits if keep else logits[:0]

    def suppress(self, logits: torch.Tensor) -> torch.Tensor:
        """The ids the model never samples, at any temperature, masked (as in transformers' generate)."""
        return logits if self.suppress_bias is None else logits + self.suppress_bias

    def _long_rope(self, inputs: list[StepInput]) -> torch.Tensor | None:
        if self.rope_regime is None:
            return None
        return self.rope_regime.token_flags([item.sequence_tokens for item in inputs for _ in item.token_ids],
                                            self.device)


def _suppress_bias(loaded: LoadedModel) -> torch.Tensor:
    """[vocab] float32: -inf at the suppressed ids, 0 elsewhere (one add per step; an index_fill_
    of gpt2-small-random's 50129 ids cost 1 ms at 16 sequences). Built in Python, not by a torch
    op: a parallel CPU op on a thread other than the engine's slows the engine's forwards (see
    model_support._in_own_thread)."""
    suppressed = set(loaded.suppressed_ids)
    vocab = loaded.model.get_output_embeddings().weight.shape[0]
    return torch.tensor([float("-inf") if i in suppressed else 0.0 for i in range(vocab)],
                        dtype=torch.float32, device=loaded.layout.device)
