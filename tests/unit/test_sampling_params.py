"""vLLM's sampling parameters, each against a reference: transformers' own logits processors
(on the same logits, and in a greedy loop over the real tiny-gpt2 preset through transformers),
or a log_softmax of the same forward through transformers (logprobs)."""

import collections
import dataclasses
import itertools

import pytest
import torch
from transformers import (MinNewTokensLengthLogitsProcessor, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                          SequenceBiasLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from services.worker.engine.detokenizer import DecodeOptions, DetokState, decode, next_text
from services.worker.engine.engine import Engine
from services.worker.engine.sampling import (frequency_presence_penalty, make_generator, process_logits,
                                             repetition_penalty, sample_token, warp)
from services.worker.engine.sequence import Request, SamplingParams
from services.worker.engine.stop import StopMatcher
from services.worker.model.presets import build_byte_tokenizer
from tests.unit.test_engine import hf_model  # noqa: F401 - a fixture
from tests.unit.test_engine import Collector, encode, make_engine

PROMPT = "The quick brown fox jumps over the lazy dog. "
_names = itertools.count()


def random_logits(seed: int, vocab: int = 300) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3


def hf(processor, input_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
    """A transformers processor on one row: it takes input_ids [1, S] and scores [1, vocab]."""
    return processor(torch.tensor([input_ids]), logits.unsqueeze(0).clone())[0]


# --- each processor against transformers' ------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("temperature, top_k, min_p", [(1.0, 5, 0.0), (0.7, 0, 0.1), (1.3, 20, 0.05),
                                                       (1.0, 1, 0.0), (0.5, 0, 1.0)])
def test_temperature_min_p_top_k_equal_transformers_warpers(seed, temperature, top_k, min_p):
    logits = random_logits(seed)
    expected = hf(TemperatureLogitsWarper(temperature), [0], logits)
    if min_p:
        expected = hf(MinPLogitsWarper(min_p), [0], expected)
    if top_k:
        expected = hf(TopKLogitsWarper(top_k), [0], expected)
    assert torch.equal(torch.isinf(warp(logits, temperature, top_k, min_p)), torch.isinf(expected))
    torch.testing.assert_close(warp(logits, temperature, top_k, min_p), expected)


@pytest.mark.parametrize("penalty", [1.3, 0.8, 2.0])
def test_repetition_penalty_equals_transformers(penalty):
    logits, ids = random_logits(1), [3, 7, 7, 250, 12, 3]
    torch.testing.assert_close(repetition_penalty(logits, ids, penalty),
                               hf(RepetitionPenaltyLogitsProcessor(penalty), ids, logits))


def test_frequency_and_presence_penalties_equal_transformers_sequence_bias():
    """OpenAI's formula (logit - frequency * count - presence * [count > 0], generated tokens only)
    as transformers' SequenceBiasLogitsProcessor biases."""
    logits, output = random_logits(2), [5, 9, 5, 5, 40]
    counts = {5: 3, 9: 1, 40: 1}
    bias = {(t,): -(0.4 * c + 0.7) for t, c in counts.items()}
    torch.testing.assert_close(frequency_presence_penalty(logits, output, 0.4, 0.7),
                               hf(SequenceBiasLogitsProcessor(bias), [1, 2], logits))


@pytest.mark.parametrize("generated", [0, 2, 3, 4])
def test_min_tokens_masks_the_stop_tokens_as_transformers_min_new_tokens(generated):
    logits, prompt = random_logits(3), [1, 2, 3, 4, 5]
    params = SamplingParams(min_tokens=3)
    output = [7] * generated
    expected = hf(MinNewTokensLengthLogitsProcessor(len(prompt), 3, [299, 17]), prompt + output, logits)
    torch.testing.assert_close(process_logits(logits, params, prompt + output, output, (299, 17)), expected)


def test_top_k_1_and_min_p_1_sample_only_the_top_token():
    logits, gen = random_logits(4), make_generator(0, torch.device("cpu"))
    top = int(logits.argmax())
    assert {sample_token(logits, 1.5, 1.0, gen, top_k=1) for _ in range(50)} == {top}
    assert {sample_token(logits, 1.5, 1.0, gen, min_p=1.0) for _ in range(50)} == {top}
    assert len({sample_token(logits, 1.5, 1.0, gen, top_k=3) for _ in range(200)}) == 3


def test_sampled_frequencies_follow_transformers_top_k_top_p_distribution():
    """sample_token draws among the top k alone: its frequencies match the distribution that
    transformers' TopKLogitsWarper then TopPLogitsWarper leave (5 standard deviations)."""
    logits, n = random_logits(5) / 3, 6000
    expected = hf(TopPLogitsWarper(0.8), [0], hf(TopKLogitsWarper(6), [0], logits / 0.9)).softmax(-1)
    gen = make_generator(1, torch.device("cpu"))
    counts = collections.Counter(sample_token(logits, 0.9, 0.8, gen, top_k=6) for _ in range(n))
    assert set(counts) <= set(torch.nonzero(expected).flatten().tolist())
    for token, p in enumerate(expected.tolist()):
        assert abs(counts[token] / n - p) <= 5 * (p * (1 - p) / n) ** 0.5 + 1e-9, token


def test_top_k_keeps_every_token_tied_at_the_kth_value():
    logits = torch.tensor([5.0, 3.0, 3.0, 3.0, 1.0])
    gen = make_generator(2, torch.device("cpu"))
    assert {sample_token(logits, 1.0, 1.0, gen, top_k=2) for _ in range(300)} == {0, 1, 2, 3}


# --- through the engine, against transformers' greedy loop with the same processors ------------
def hf_greedy_with(model, ids: list[int], max_tokens: int, processors) -> list[int]:
    """transformers' greedy decoding (the model's suppress_tokens included) with `processors`
    (transformers LogitsProcessors) applied to each step's scores, as generate applies them."""
    ids, out = list(ids), []
    suppressed = model.generation_config.suppress_tokens or []
    with torch.inference_mode():
        for _ in range(max_tokens):
            scores = model(input_ids=torch.tensor([ids])).logits[:, -1].float()
            scores[0, suppressed] = float("-inf")
            for processor in processors(ids, out):
                scores = processor(torch.tensor([ids]), scores)
            out.append(int(scores[0].argmax()))
            ids.append(out[-1])
    return out


def run(engine: Engine, prompt_ids: list[int], stateless: bool = True, **params) -> Collector:
    sink = Collector()
    engine.submit(Request(seq_id=f"r{next(_names)}", token_ids=list(prompt_ids), prompt_tokens=len(prompt_ids),
                          sink=sink, stateless=stateless, params=SamplingParams(**params)))
    return sink.wait()


@pytest.fixture
def engine(loaded_tiny):
    with make_engine(loaded_tiny, tail_wait_s=0.0) as eng:
        yield eng


def test_greedy_with_penalties_equals_transformers(engine, hf_model):
    ids = encode(engine, PROMPT)
    got = run(engine, ids, max_tokens=20, temperature=0.0, repetition_penalty=1.5).token_ids
    assert got == hf_greedy_with(hf_model, ids, 20, lambda ctx, out: [RepetitionPenaltyLogitsProcessor(1.5)])

    def openai_penalties(ctx, out):
        counts = {t: out.count(t) for t in set(out)}
        return [SequenceBiasLogitsProcessor({(t,): -(0.5 * c + 1.0) for t, c in counts.items()})] if out else []

    got = run(engine, ids, max_tokens=20, temperature=0.0, frequency_penalty=0.5, presence_penalty=1.0).token_ids
    assert got == hf_greedy_with(hf_model, ids, 20, openai_penalties)
    assert got != run(engine, ids, max_tokens=20, temperature=0.0).token_ids  # the penalties changed something


def test_top_k_1_and_min_p_1_at_temperature_1_are_greedy(engine, hf_model):
    ids = encode(engine, PROMPT)
    greedy = hf_greedy_with(hf_model, ids, 16, lambda ctx, out: [])
    assert run(engine, ids, max_tokens=16, temperature=1.0, top_k=1, seed=3).token_ids == greedy
    assert run(engine, ids, max_tokens=16, temperature=1.0, min_p=1.0, seed=3).token_ids == greedy
    assert run(engine, ids, max_tokens=16, temperature=1.0, seed=3).token_ids != greedy


def eos_engine(loaded_tiny, engine: Engine) -> tuple[list[int], int, object]:
    """The greedy tokens, an index j whose token appears there first, and the model with that
    token as its EOS (the preset's own EOS is never chosen greedily)."""
    tokens = run(engine, encode(engine, PROMPT), max_tokens=16, temperature=0.0).token_ids
    j = next(i for i in range(2, 16) if tokens[i] not in tokens[:i])
    return tokens, j, dataclasses.replace(loaded_tiny, eos_token_id=tokens[j])


def test_ignore_eos_min_tokens_and_stop_token_ids(loaded_tiny, engine, hf_model):
    tokens, j, loaded = eos_engine(loaded_tiny, engine)
    ids, eos = encode(engine, PROMPT), tokens[j]
    with make_engine(loaded, tail_wait_s=0.0) as eos_eng:
        assert run(eos_eng, ids, max_tokens=16, temperature=0.0).token_ids == tokens[:j + 1]
        ignored = run(eos_eng, ids, max_tokens=16, temperature=0.0, ignore_eos=True)
        assert ignored.token_ids == tokens and ignored.done["finish_reason"] == "length"
        # min_tokens: the EOS masked until j + 3 tokens, as transformers' MinNewTokensLength does.
        held = run(eos_eng, ids, max_tokens=16, temperature=0.0, min_tokens=j + 3)
        expected = hf_greedy_with(hf_model, ids, 16, lambda ctx, out: [
            MinNewTokensLengthLogitsProcessor(len(ids), j + 3, [eos])])
        stop_at = next((i for i, t in enumerate(expected) if t == eos and i >= j + 2), 15)
        assert held.token_ids == expected[:stop_at + 1]
    stopped = run(engine, ids, max_tokens=16, temperature=0.0, stop_token_ids=(eos,))
    assert stopped.token_ids == tokens[:j + 1] and stopped.done["finish_reason"] == "stop"
    assert stopped.done["text"] == engine.tokenizer.decode(tokens[:j])  # the stop token's text is not output
    kept = run(engine, ids, max_tokens=16, temperature=0.0, stop_token_ids=(eos,), include_stop_str_in_output=True)
    assert kept.done["text"] == engine.tokenizer.decode(tokens[:j + 1])
    assert "".join(e["token"] for e in kept.events[1:-1]) == kept.done["text"]


def test_stop_strings_with_include_and_min_tokens(engine):
    ids = encode(engine, PROMPT)
    text = run(engine, ids, max_tokens=16, temperature=0.0).done["text"]
    stop = text[4:6]
    assert run(engine, ids, max_tokens=16, temperature=0.0, stop=(stop,)).done["text"] == text[:4]
    assert run(engine, ids, max_tokens=16, temperature=0.0, stop=(stop,),
               include_stop_str_in_output=True).done["text"] == text[:6]
    late = run(engine, ids, max_tokens=16, temperature=0.0, stop=(stop,), min_tokens=len(text))  # 1 token per byte
    assert late.done["finish_reason"] == "length" and late.done["text"] == text


@torch.inference_mode()
def test_logprobs_equal_log_softmax_of_the_transformers_forward(engine, hf_model):
    ids = encode(engine, PROMPT)
    result = run(engine, ids, max_tokens=6, temperature=0.0, logprobs=5, prompt_logprobs=3)
    out = result.token_ids
    reference = torch.log_softmax(hf_model(input_ids=torch.tensor([ids + out])).logits[0].float(), dim=-1)
    for i, event in enumerate(result.events[1:-1]):
        row = reference[len(ids) - 1 + i]  # the position that predicted generated token i
        entry = event["logprobs"]
        assert entry["token_id"] == out[i] and entry["token"] == engine.tokenizer.decode([out[i]])
        assert entry["logprob"] == pytest.approx(float(row[out[i]]), abs=1e-4)
        top = torch.topk(row, 5)
        assert [t["token_id"] for t in entry["top_logprobs"]] == top.indices.tolist()
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(top.values.tolist(), abs=1e-4)
    prompt_lps = result.events[1]["prompt_logprobs"]
    assert len(prompt_lps) == len(ids)
    assert prompt_lps[0] == {"token_id": ids[0], "token": engine.tokenizer.decode(ids[:1]), "logprob": None,
                             "top_logprobs": None}
    for i in range(1, len(ids)):
        assert prompt_lps[i]["token_id"] == ids[i]
        assert prompt_lps[i]["logprob"] == pytest.approx(float(reference[i - 1, ids[i]]), abs=1e-4)
        assert [t["token_id"] for t in prompt_lps[i]["top_logprobs"]] == torch.topk(reference[i - 1], 3).indices.tolist()
    assert "prompt_logprobs" not in result.events[2]


def test_prompt_logprobs_over_a_chunked_prefill_and_a_cached_prompt(loaded_tiny, hf_model):
    """A prompt longer than a step's token budget is prefilled in chunks; a cached prompt is
    recomputed (no reuse): both report every prompt position."""
    with make_engine(loaded_tiny, tail_wait_s=0.0, max_batch_tokens=16) as eng:
        ids = encode(eng, PROMPT * 2)
        run(eng, ids, max_tokens=2, temperature=0.0)  # now cached
        result = run(eng, ids, max_tokens=2, temperature=0.0, prompt_logprobs=0)
        assert result.start["cached_tokens"] == 0
        with torch.inference_mode():
            reference = torch.log_softmax(hf_model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
        got = [e["logprob"] for e in result.events[1]["prompt_logprobs"][1:]]
        assert got == pytest.approx([float(reference[i - 1, ids[i]]) for i in range(1, len(ids))], abs=1e-4)


def test_n_siblings_copy_the_prompt_kv_and_sample_apart(engine):
    ids = encode(engine, PROMPT * 3)
    sinks = [Collector() for _ in range(3)]
    first = None
    for i, sink in enumerate(sinks):
        req = Request(seq_id=f"n{i}", token_ids=list(ids), prompt_tokens=len(ids), sink=sink, stateless=True,
                      params=SamplingParams(max_tokens=12, temperature=1.0, seed=10 + i), prompt_source=first)
        first = first or req
        engine.submit(req)
    results = [s.wait() for s in sinks]
    assert [r.start["cached_tokens"] for r in results] == [0, len(ids) - 1, len(ids) - 1]
    assert len({tuple(r.token_ids) for r in results}) == 3
    alone = run(engine, ids, max_tokens=12, temperature=1.0, seed=11)  # sibling 1's seed, from scratch
    assert alone.token_ids == results[1].token_ids


# --- decoding options, stop strings --------------------------------------------------------------
def test_skip_and_spaces_between_special_tokens():
    tok = build_byte_tokenizer(257)
    ids = list(b"ab") + [256, 256] + list(b"c")
    assert decode(tok, ids) == "abc"
    assert decode(tok, ids, DecodeOptions(skip_special_tokens=False)) == "ab <|endoftext|> <|endoftext|> c"
    assert decode(tok, ids, DecodeOptions(False, False)) == "ab<|endoftext|><|endoftext|>c"
    for options in (DecodeOptions(False, True), DecodeOptions(False, False), DecodeOptions()):
        state = DetokState()
        pieces = [next_text(tok, ids[:i], state, options=options) for i in range(1, len(ids) + 1)]
        assert "".join(pieces) == decode(tok, ids, options)


def test_include_stop_str_keeps_the_stop_string():
    matcher = StopMatcher(["<|end|>"], include=True)
    assert matcher.push("Hello <|e") == ("Hello ", False)
    assert matcher.push("nd|> more") == ("<|e" + "nd|>", True)
