"""Chat messages to prompt token ids, with the tokenizer's own chat template.

A tokenizer without a chat template (the hub's `gpt2`, say) gets DEFAULT_CHAT_TEMPLATE, which
the offline presets also ship in their saved tokenizer:

    <|system|>\\n{content}<|end|>\\n<|user|>\\n{content}<|end|>\\n<|assistant|>\\n

Every message is rendered the same way whatever follows it, and the generation prompt is the
opening of an assistant message. So a conversation's next request (its history, the assistant's
reply, a new user message) renders as a textual extension of the previous prompt followed by
the reply: the previous request's KV is a prefix of the next one (prefix caching across turns).
The tags are plain text, not special tokens: a message that contains them can imitate a turn.

Blocking (tokenization): call it off the event loop.
"""

from collections.abc import Sequence

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def chat_prompt_ids(tokenizer, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
    """The rendered prompt's token ids, the assistant's generation prompt included (by default)."""
    template = None if getattr(tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE
    # transformers 5: `tokenize=True` returns a BatchEncoding unless return_dict=False. The
    # rendered text is tokenized without added special tokens (a template writes its own BOS).
    ids = tokenizer.apply_chat_template(list(messages), chat_template=template,
                                        add_generation_prompt=add_generation_prompt,
                                        tokenize=True, return_dict=False)
    return list(ids)
