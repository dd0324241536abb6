"""Every architecture the worker accepts gives transformers' own greedy `generate` tokens (eager
attention, its own cache), token for token, through the engine's packed KV path: a prompt, a
continuation from cached KV, 4 concurrent sequences of different lengths, contexts past the
sliding window, a turn after a KV handoff (through the wire format), and a turn after a prefix
copy. An architecture the engine cannot honour must be refused at load, naming its model type.

The engine here is the worker's own (`load_model`, `Engine`, `KVStore`), driven in-process.
"""

import random

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from services.worker.kv import transfer as kv_transfer
from services.worker.engine.sequence import Request, SamplingParams
from services.worker.model.loader import load_model
from services.worker.model.model_support import UnsupportedModel
from tests.conformance.architectures import LONGROPE_ORIGINAL, REFUSED, SERVED, WINDOW, build
from tests.unit.test_engine import WAIT_S, Collector, make_engine, wait_idle

NEW_TOKENS = 12


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(256) for _ in range(n)]


class Subject:
    """One architecture: the engine under test and the transformers reference."""

    def __init__(self, arch, path):
        self.arch = arch
        self.loaded = load_model(str(path), path.parent, device="cpu", dtype="float32")
        self.reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
        self.eos = self.loaded.eos_token_id

    @torch.inference_mode()
    def expected(self, context: list[int], n: int = NEW_TOKENS) -> list[int]:
        ids = torch.tensor([context])
        out = self.reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                      pad_token_id=self.eos)[0, len(context):].tolist()
        return out[:out.index(self.eos) + 1] if self.eos in out else out


def submit(engine, seq_id: str, token_ids: list[int], prompt_tokens: int, n: int = NEW_TOKENS,
           stateless: bool = False) -> Collector:
    sink = Collector()
    engine.submit(Request(seq_id=seq_id, token_ids=list(token_ids), prompt_tokens=prompt_tokens, sink=sink,
                          stateless=stateless, params=SamplingParams(max_tokens=n, temperature=0.0)))
    return sink


def turn(engine, seq_id: str, prompt: list[int], n: int = NEW_TOKENS) -> tuple[Collector, list[int]]:
    """A session turn as the worker builds it: the sequence's history, then the new prompt."""
    with engine.lock:
        entry = engine.store.get(seq_id)
        history = list(entry.token_ids) if entry else []
    context = history + prompt
    return submit(engine, seq_id, context, len(prompt), n).wait(), context


@pytest.fixture(scope="module", params=SERVED, ids=lambda arch: arch.name)
def subject(request, tmp_path_factory):
    arch = request.param
    return Subject(arch, build(arch, tmp_path_factory.mktemp("models") / arch.name))


@pytest.mark.parametrize("arch", REFUSED, ids=lambda arch: arch.name)
def test_an_architecture_the_engine_cannot_honour_is_refused_at_load(arch, tmp_path):
    path = build(arch, tmp_path / arch.name)
    with pytest.raises(UnsupportedModel) as refusal:
        load_model(str(path), tmp_path, device="cpu", dtype="float32")
    model_type = getattr(transformers, arch.config_class).model_type
    assert refusal.value.model_type == model_type
    assert str(refusal.value).startswith(f"model type '{model_type}' is not supported: ")
    assert arch.refused in refusal.value.feature


def test_a_prompt_past_the_window(subject):
    rng = random.Random(1)
    with make_engine(subject.loaded) as engine:
        for length in (5, WINDOW + 9, 3 * WINDOW + 5):
            prompt = _ids(rng, length)
            result, _ = turn(engine, f"p{length}", prompt, n=2 * WINDOW)
            assert result.token_ids == subject.expected(prompt, 2 * WINDOW), f"prompt of {length}"


@pytest.mark.parametrize("tail_wait_s", [0.0, WAIT_S], ids=["own-step", "held-tail"])
def test_a_continuation_from_cached_kv(subject, tail_wait_s):
    """The earlier turn's last token gets its KV in a step of its own, or (held for the next
    request, which comes at once) in the continuation's first step."""
    rng = random.Random(2)
    computed_here = 1 if tail_wait_s == 0 else 2  # the new token, and the held one
    with make_engine(subject.loaded, tail_wait_s=tail_wait_s) as engine:
        turn(engine, "s", _ids(rng, 2 * WINDOW))
        second, context = turn(engine, "s", _ids(rng, 7))
        assert second.start["cached_tokens"] > 0
        assert second.token_ids == subject.expected(context)
        third, context = turn(engine, "s", _ids(rng, 1))
        assert third.start["cached_tokens"] == len(context) - computed_here
        assert third.token_ids == subject.expected(context)


def test_four_concurrent_sequences_of_different_lengths(subject):
    rng = random.Random(3)
    prompts = [_ids(rng, n) for n in (3, WINDOW + 2, 2 * WINDOW + 7, LONGROPE_ORIGINAL + 9)]
    # Queued before the engine starts, so the first steps pack all four (long prompts in chunks).
    with make_engine(subject.loaded, start=False, max_batch_tokens=32) as engine:
        sinks = [submit(engine, f"c{i}", prompt, len(prompt), n=20) for i, prompt in enumerate(prompts)]
        engine.start()
        results = [sink.wait().token_ids for sink in sinks]
        assert engine.stats()["steps"] < sum(len(r) for r in results)  # they shared steps
    for prompt, tokens in zip(prompts, results):
        assert tokens == subject.expected(prompt, 20), f"prompt of {len(prompt)}"


def test_a_sequence_crossing_longropes_original_window(subject):
    """Prefill below the original window, decode across it, then a turn above it (every model:
    for the others these are just long contexts)."""
    rng = random.Random(4)
    with make_engine(subject.loaded) as engine:
        first, context = turn(engine, "x", _ids(rng, LONGROPE_ORIGINAL - 6), n=16)
        assert first.token_ids == subject.expected(context, 16)
        second, context = turn(engine, "x", _ids(rng, 5))
        assert second.token_ids == subject.expected(context)
        short, context = turn(engine, "y", _ids(rng, 9))  # beside the long one's cached KV
        assert short.token_ids == subject.expected(context)


def test_a_turn_after_a_kv_handoff(subject):
    rng = random.Random(5)
    layout = subject.loaded.layout
    with make_engine(subject.loaded) as old_owner, make_engine(subject.loaded) as new_owner:
        turn(old_owner, "h", _ids(rng, 2 * WINDOW + 3))
        wait_idle(old_owner)  # the last token's KV is written after `done`
        ids, kv = old_owner.pin_for_export("h")
        wire = b"".join(kv_transfer.data_pieces(kv, len(ids)))  # as the handoff sends it
        old_owner.unpin("h")
        received = kv_transfer.as_kv(bytearray(wire), layout, len(ids))
        assert new_owner.import_kv("h", ids, received, reserve_tokens=len(ids)) == len(ids)
        prompt = _ids(rng, 6)
        result = submit(new_owner, "h", ids + prompt, len(prompt)).wait()
        assert result.start["handoff_tokens"] == len(ids)
        assert result.token_ids == subject.expected(ids + prompt)


def test_a_turn_after_a_prefix_copy(subject):
    rng = random.Random(6)
    shared = _ids(rng, 2 * 64)  # two prefix-index blocks
    with make_engine(subject.loaded) as engine:
        submit(engine, "a", shared + _ids(rng, 5), len(shared) + 5, stateless=True).wait()
        prompt = shared + _ids(rng, 7)
        result = submit(engine, "b", prompt, len(prompt), stateless=True).wait()
        assert result.start["cached_tokens"] >= 64  # copied from the first request's entry
        assert result.token_ids == subject.expected(prompt)


def test_llama4_steps_pack_fewer_tokens_than_its_floor_scale(tmp_path):
    """Its temperature tuning is right only while a packed step is shorter than floor_scale."""
    arch = next(a for a in SERVED if a.name == "llama4")
    loaded = load_model(str(build(arch, tmp_path / "llama4")), tmp_path, device="cpu", dtype="float32")
    floor_scale = arch.kwargs["floor_scale"]
    assert loaded.spec.max_step_tokens == floor_scale - 1
    with make_engine(loaded, start=False, max_batch_tokens=512) as engine:
        assert engine.scheduler.max_batch_tokens == floor_scale - 1
    with pytest.raises(ValueError, match="exceeds"):
        loaded.spec.check_step(floor_scale)
