"""The presets' suppressed ids (EOS, and every id >= 128 with ascii_output) are never sampled, at
any temperature or top_p: sampled text is ASCII and re-encodes to the same ids, through the
engine as a client would sample it."""

import itertools

import pytest

from services.worker.engine.sequence import Request, SamplingParams
from services.worker.model.loader import load_model
from services.worker.model.presets import PRESETS, suppressed_ids
from tests.unit.test_engine import Collector, make_engine

_names = itertools.count()
TOKENS, RUNS = 32, 8


@pytest.fixture(scope="module", params=sorted(PRESETS))
def loaded(request, tmp_path_factory, tiny_model_cache_dir):
    cache_dir = tiny_model_cache_dir if request.param == "tiny-gpt2" else tmp_path_factory.mktemp("models")
    return load_model(request.param, cache_dir, device="cpu", dtype="float32")


def sample(engine, prompt_ids: list[int], temperature: float, top_p: float, seed: int) -> Collector:
    sink = Collector()
    engine.submit(Request(seq_id=f"r{next(_names)}", token_ids=prompt_ids, prompt_tokens=len(prompt_ids), sink=sink,
                          stateless=True, params=SamplingParams(max_tokens=TOKENS, temperature=temperature,
                                                                top_p=top_p, seed=seed)))
    return sink


def test_the_suppressed_ids_are_the_presets_and_travel_in_its_generation_config(loaded):
    spec = PRESETS[loaded.name]
    assert loaded.suppressed_ids == suppressed_ids(spec)
    assert loaded.model.generation_config.suppress_tokens == suppressed_ids(spec)
    assert spec.vocab_size - 1 in loaded.suppressed_ids  # EOS
    assert (128 in loaded.suppressed_ids) == spec.ascii_output


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (2.0, 1.0), (2.0, 0.95)])
def test_sampled_ids_decode_to_ascii_and_reencode_to_themselves(loaded, temperature, top_p):
    tokenizer = loaded.tokenizer
    prompt = tokenizer.encode("Tell me about caches. ", add_special_tokens=False)
    with make_engine(loaded) as engine:
        sinks = [sample(engine, prompt, temperature, top_p, seed) for seed in range(RUNS)]  # one batch
        runs = [sink.wait().token_ids for sink in sinks]
    sampled = [t for run in runs for t in run]
    assert len(sampled) == RUNS * TOKENS  # EOS never ended a run
    assert len(set(sampled)) > 20  # really sampled, not greedy
    for run in runs:
        text = tokenizer.decode(run)
        assert text.isascii(), text
        assert tokenizer.encode(text, add_special_tokens=False) == run
