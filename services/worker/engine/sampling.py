"""Token sampling, in vLLM's order: the logits' masks and penalties (`process_logits`), then
greedy at temperature 0, else temperature, min_p, top_k (`warp`) and nucleus (top_p) sampling.

Every function takes one request's logits row `[vocab]` float32; the engine thread calls them
once per sampled row of a step (the forward pass stays batched).
"""

from collections.abc import Sequence

import torch

NEG_INF = float("-inf")
MIN_LOGPROB = -9999.0  # JSON has no -inf: vLLM reports at most this low


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def process_logits(logits: torch.Tensor, params, context_ids: Sequence[int], output_ids: Sequence[int],
                   stop_token_ids: Sequence[int]) -> torch.Tensor:
    """min_tokens (the stop tokens masked while fewer than min_tokens were generated), then the
    repetition penalty (over the whole context, generated tokens included: transformers' and
    vLLM's), then the frequency and presence penalties (over the generated tokens, OpenAI's
    formula). Returns `logits` itself when no parameter applies."""
    if len(output_ids) < params.min_tokens and stop_token_ids:
        logits = logits.index_fill(0, torch.tensor(list(stop_token_ids), device=logits.device), NEG_INF)
    if params.repetition_penalty != 1.0 and context_ids:
        logits = repetition_penalty(logits, context_ids, params.repetition_penalty)
    if (params.frequency_penalty or params.presence_penalty) and output_ids:
        logits = frequency_presence_penalty(logits, output_ids, params.frequency_penalty, params.presence_penalty)
    return logits


def repetition_penalty(logits: torch.Tensor, token_ids: Sequence[int], penalty: float) -> torch.Tensor:
    ids = torch.tensor(sorted(set(token_ids)), device=logits.device)
    seen = logits[ids]
    out = logits.clone()
    out[ids] = torch.where(seen < 0, seen * penalty, seen / penalty)
    return out


def frequency_presence_penalty(logits: torch.Tensor, output_ids: Sequence[int], frequency: float,
                               presence: float) -> torch.Tensor:
    counts = torch.bincount(torch.tensor(list(output_ids), device=logits.device), minlength=logits.shape[0])
    counts = counts[:logits.shape[0]].to(logits.dtype)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def warp(logits: torch.Tensor, temperature: float, top_k: int = 0, min_p: float = 0.0) -> torch.Tensor:
    """Temperature, then min_p (drop tokens under min_p times the top probability), then top_k
    (keep the k highest, ties included): transformers' TemperatureLogitsWarper, MinPLogitsWarper
    and TopKLogitsWarper, in vLLM's order. temperature > 0."""
    return _filter(logits / temperature, top_k, min_p)


def _filter(scaled: torch.Tensor, top_k: int, min_p: float) -> torch.Tensor:
    if min_p > 0.0:
        scaled = _min_p(scaled, min_p)
    if 0 < top_k < scaled.shape[0]:
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, NEG_INF)
    return scaled


def _min_p(scaled: torch.Tensor, min_p: float) -> torch.Tensor:
    probs = torch.softmax(scaled, dim=-1)
    return scaled.masked_fill(probs < min_p * probs.max(), NEG_INF)


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator,
                 top_k: int = 0, min_p: float = 0.0) -> int:
    # logits: [vocab] float32
    if temperature == 0:
        return int(torch.argmax(logits))
    scaled = logits / temperature
    if not torch.isfinite(scaled.max()):  # a temperature so small it overflows: its limit is greedy
        return int(torch.argmax(logits))
    if min_p > 0.0:
        scaled = _min_p(scaled, min_p)
    if 0 < top_k < scaled.shape[0]:
        values, ids = torch.topk(scaled, top_k)  # [top_k], descending
        if int((scaled >= values[-1]).sum()) == top_k:
            # No tie at the k-th value: the same distribution as masking the rest, drawn from k
            # entries instead of the vocabulary (a full-vocabulary multinomial costs ~5 ms at 50k).
            return int(ids[_draw(torch.softmax(values, dim=-1), top_p, generator, descending=True)])
        scaled = scaled.masked_fill(scaled < values[-1], NEG_INF)  # ties are all kept (transformers')
    return _draw(torch.softmax(scaled, dim=-1), top_p, generator)


def _draw(probs: torch.Tensor, top_p: float, generator: torch.Generator, descending: bool = False) -> int:
    """An index of `probs` drawn from its nucleus (the smallest most-likely prefix whose mass reaches top_p)."""
    if top_p >= 1.0:
        return int(torch.multinomial(probs, 1, generator=generator))
    sorted_probs, order = (probs, None) if descending else torch.sort(probs, descending=True)
    # Keep the smallest prefix whose mass reaches top_p, and always the top token: a top_p
    # below float32's range (1e-240, found by the fuzzer) compares as 0 and would drop them all.
    drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p
    drop[0] = False
    choice = torch.multinomial(sorted_probs.masked_fill(drop, 0.0), 1, generator=generator)
    return int(choice) if order is None else int(order[choice])


def logprobs_of(logits: torch.Tensor, token_ids: Sequence[int], num_top: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """For rows `logits` `[n, vocab]` (the model's raw output, as vLLM reports by default) and the
    token each row chose: (that token's log-probability, the `num_top` most likely (id, logprob))."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # [n, vocab]
    chosen = lp.gather(1, torch.tensor(list(token_ids), device=lp.device).unsqueeze(1))[:, 0].tolist()
    if num_top > 0:
        top = torch.topk(lp, num_top, dim=-1)
        tops = [list(zip(ids, values)) for ids, values in zip(top.indices.tolist(), top.values.tolist())]
    else:
        tops = [[] for _ in chosen]
    return [(max(c, MIN_LOGPROB), [(i, max(v, MIN_LOGPROB)) for i, v in t]) for c, t in zip(chosen, tops)]
