"""Runs one packed forward pass over the scheduled sequences' new tokens."""

from dataclasses import dataclass

import torch

from services.worker.kv_store import SequenceKV
from services.worker.model.attention import Segment
from services.worker.model.loader import LoadedModel


@dataclass(frozen=True)
class StepInput:
    kv: SequenceKV
    token_ids: list[int]   # new tokens, at positions kv.num_tokens ...
    sample: bool           # return logits at the last new token


class ModelRunner:
    def __init__(self, loaded: LoadedModel):
        self.model = loaded.model
        self.device = loaded.layout.device

    @torch.inference_mode()
    def forward(self, inputs: list[StepInput]) -> torch.Tensor:
        """Writes every input's K/V into its buffer (callers advance kv.num_tokens) and returns
        float32 logits `[num_sampled, vocab]` for the inputs with sample=True, in order."""
        segments, ids, positions, keep = [], [], [], []
        offset = 0
        for item in inputs:
            n, start = len(item.token_ids), item.kv.num_tokens
            segments.append(Segment(item.kv, start, n, offset))
            ids.extend(item.token_ids)
            positions.extend(range(start, start + n))
            offset += n
            if item.sample:
                keep.append(offset - 1)
        input_ids = torch.tensor([ids], device=self.device)          # [1, T]
        position_ids = torch.tensor([positions], device=self.device)  # [1, T]
        # Only the sampled positions go through the LM head (it is the largest matmul).
        logits_to_keep = torch.tensor(keep or [offset - 1], device=self.device)
        out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                         logits_to_keep=logits_to_keep, kv_segments=segments)
        logits = out.logits[0].float()  # [len(keep), vocab]
        return logits if keep else logits[:0]
