"""Chat messages to prompt ids: the tokenizer's own template, or the documented default, whose
next turn renders as the previous prompt plus the reply (what prefix caching across turns needs)."""

import pytest
from transformers import AutoTokenizer

from services.worker.chat_template import DEFAULT_CHAT_TEMPLATE, chat_prompt_ids
from services.worker.model.presets import build_byte_tokenizer, resolve_model_path


@pytest.fixture(scope="module")
def tokenizer(tiny_model_cache_dir):
    """The saved preset, loaded back as a worker loads it."""
    return AutoTokenizer.from_pretrained(resolve_model_path("tiny-gpt2", tiny_model_cache_dir))


def text_of(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids)


def test_the_preset_ships_the_default_template(tokenizer):
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE


def test_default_rendering(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    ids = chat_prompt_ids(tokenizer, messages)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert text_of(tokenizer, ids) == "<|system|>\nBe brief.<|end|>\n<|user|>\nHi!<|end|>\n<|assistant|>\n"
    assert ids == tokenizer.encode(text_of(tokenizer, ids), add_special_tokens=False)  # no BOS added


def test_next_turn_extends_the_previous_prompt_and_reply(tokenizer):
    history = [{"role": "system", "content": "S"}, {"role": "user", "content": "first question"}]
    for turn in range(3):
        prompt = chat_prompt_ids(tokenizer, history)
        reply = f"answer number {turn}"
        history += [{"role": "assistant", "content": reply},
                    {"role": "user", "content": f"follow-up {turn}"}]
        nxt = chat_prompt_ids(tokenizer, history)
        expected_start = prompt + tokenizer.encode(reply, add_special_tokens=False)
        assert nxt[:len(expected_start)] == expected_start, turn


def test_a_tokenizer_without_a_template_gets_the_default():
    bare = build_byte_tokenizer(257)
    bare.chat_template = None
    ids = chat_prompt_ids(bare, [{"role": "user", "content": "x"}])
    assert bare.decode(ids) == "<|user|>\nx<|end|>\n<|assistant|>\n"


def test_a_tokenizer_with_its_own_template_uses_it():
    own = build_byte_tokenizer(257)
    own.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}")
    ids = chat_prompt_ids(own, [{"role": "developer", "content": "rules"}, {"role": "user", "content": "q"}])
    assert own.decode(ids) == "[developer] rules\n[user] q\n[assistant] "
