"""Offline model presets: built once with seeded random weights, saved, then loaded back
through the ordinary `from_pretrained` path like any Hugging Face model."""

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from services.worker.chat_template import DEFAULT_CHAT_TEMPLATE

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PRESET_VERSION = 5  # bump when a preset's recipe changes, so cached copies are rebuilt


@dataclass(frozen=True)
class Preset:
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    n_positions: int = 1024
    seed: int = 0
    initializer_range: float = 0.02
    # Output stays ASCII at any temperature (every token id past 127 suppressed), so generated
    # text re-encodes to the same ids: a client that resends its history finds the reply's KV cached.
    ascii_output: bool = False
    tied: bool = True  # GPT-2 ties its output head to the input embeddings


PRESETS = {
    # Small and fast: the default for local runs and tests.
    # Wide weight init spreads the logits, so greedy choices are far from ties.
    "tiny-gpt2": Preset(n_layer=4, n_head=4, n_embd=128, vocab_size=257, initializer_range=0.2,
                        ascii_output=True, tied=False),
    # Exactly GPT-2 124M's parameter shapes, random weights: for benchmarks.
    "gpt2-small-random": Preset(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, ascii_output=True),
}


def build_byte_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte (ids 0-255), EOS last, unused fillers in between, and the
    default role-tagged chat template.

    Byte-level BPE with no merges: text concatenation equals token concatenation.
    """
    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    byte_chars.sort(key=_byte_value)
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    for i in range(256, vocab_size - 1):
        vocab[f"<|unused_{i}|>"] = i
    vocab[EOS_TOKEN] = vocab_size - 1
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([EOS_TOKEN])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def _byte_value(ch: str) -> int:
    # GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256 + n.
    return _UNICODE_TO_BYTE[ch]


def _bytes_to_unicode() -> dict[str, int]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[chr(b)] = b
        else:
            mapping[chr(256 + extra)] = b
            extra += 1
    return mapping


_UNICODE_TO_BYTE = _bytes_to_unicode()


def build_preset(name: str, path: Path) -> None:
    spec = PRESETS[name]
    config = GPT2Config(
        vocab_size=spec.vocab_size, n_positions=spec.n_positions, n_embd=spec.n_embd,
        n_layer=spec.n_layer, n_head=spec.n_head, initializer_range=spec.initializer_range,
        bos_token_id=spec.vocab_size - 1, eos_token_id=spec.vocab_size - 1,
    )
    config.tie_word_embeddings = spec.tied
    torch.manual_seed(spec.seed)
    model = GPT2LMHeadModel(config)
    # A random model would emit EOS at random and end generations early, so EOS is suppressed.
    # With ascii_output every id >= 128 is too (bytes >= 128, and gpt2-small-random's unused
    # fillers, which decode to literal "<|unused_N|>" text), so decoded text re-encodes to the
    # same tokens. `suppress_tokens` is the standard field: its logits are -inf, in the engine
    # and in transformers' generate, so no temperature or top_p can sample them.
    model.generation_config.suppress_tokens = suppressed_ids(spec)
    # Their output rows stay zero, as up to version 4 (tied: their input embeddings too), so the
    # weights are unchanged and benchmark figures stay comparable: the bare transformers
    # reference of scenario 4 feeds random ids, whose random embeddings otherwise lead to
    # denormal activations that slow the CPU forward 15-40x (measured).
    with torch.no_grad():
        model.get_output_embeddings().weight[suppressed_ids(spec)] = 0.0
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    build_byte_tokenizer(spec.vocab_size).save_pretrained(path)
    (path / "kvcache_preset.json").write_text(json.dumps({"name": name, "version": PRESET_VERSION}))


def suppressed_ids(spec: Preset) -> list[int]:
    eos = spec.vocab_size - 1
    return (list(range(128, eos)) if spec.ascii_output else []) + [eos]


def resolve_model_path(model_name: str, cache_dir: Path) -> str:
    """A preset name becomes a local directory (built on first use); anything else is
    passed to from_pretrained unchanged (a hub id such as "gpt2", or a local path)."""
    if model_name not in PRESETS:
        return model_name
    path = cache_dir / f"{model_name}-v{PRESET_VERSION}"
    if not (path / "kvcache_preset.json").exists():
        logger.info("building preset %s in %s", model_name, path)
        # Several workers may start at once on one cache dir: build aside, then rename.
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        build_preset(model_name, tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process finished first; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return str(path)
