"""Token sampling: greedy at temperature 0, else temperature + nucleus (top_p)."""

import torch


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    # logits: [vocab] float32
    if temperature == 0:
        return int(torch.argmax(logits))
    scaled = logits / temperature
    if not torch.isfinite(scaled.max()):  # a temperature so small it overflows: its limit is greedy
        return int(torch.argmax(logits))
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p, and always the top token: a top_p
        # below float32's range (1e-240, found by the fuzzer) compares as 0 and would drop them all.
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p
        drop[0] = False
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
