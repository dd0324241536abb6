"""Load a causal LM and its tokenizer off the event loop, wired to the packed KV attention.

A model whose attention the engine cannot honour is refused here, at start-up
(model_support.UnsupportedModel), never served wrong.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from services.worker.kv.store import KVLayout
from services.worker.model import longrope
from services.worker.model.attention import ATTN_IMPLEMENTATION
from services.worker.model.model_support import AttentionSpec, inspect_model
from services.worker.model.presets import resolve_model_path

logger = logging.getLogger(__name__)

# Families whose activations overflow float16 (inf/NaN logits): never given fp16 by `auto`.
FP16_OVERFLOW_FAMILIES = {"gemma", "gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text"}


@dataclass
class LoadedModel:
    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    layout: KVLayout
    eos_token_id: int | None
    spec: AttentionSpec
    rope_regime: longrope.RopeRegime | None = None  # LongRoPE models only
    suppressed_ids: list[int] = field(default_factory=list)  # generation_config.suppress_tokens


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device, model_type: str = "", model_dtype: torch.dtype | None = None,
               bf16_supported: bool | None = None) -> torch.dtype:
    """`auto`: float32 on CPU (reduced precision is slower there, measured); on CUDA bfloat16
    where the GPU has it, else the model's own dtype (float16 for a bfloat16 model), except that
    a family known to overflow float16 gets float32."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type != "cuda":
        return torch.float32
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported(including_emulation=False)  # a T4 emulates it: slow
    if bf16_supported:
        return torch.bfloat16
    choice = model_dtype if model_dtype in (torch.float16, torch.float32) else torch.float16
    return torch.float32 if choice is torch.float16 and model_type in FP16_OVERFLOW_FAMILIES else choice


def load_model(model_name: str, cache_dir: Path, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    path = resolve_model_path(model_name, cache_dir)
    dev = pick_device(device)
    config = AutoConfig.from_pretrained(path).get_text_config()
    torch_dtype = pick_dtype(dtype, dev, config.model_type, getattr(config, "dtype", None))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation=ATTN_IMPLEMENTATION)
    model.to(dev).eval()
    spec = inspect_model(model)  # raises UnsupportedModel
    regime = longrope.install(model, spec.longrope_original) if spec.longrope_original else None
    logger.info("loaded %s (%s) on %s (%s)", model_name, config.model_type, dev, torch_dtype)
    return LoadedModel(name=model_name, model=model, tokenizer=tokenizer,
                       layout=KVLayout(num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads,
                                       head_dim=spec.head_dim, dtype=torch_dtype, device=dev,
                                       max_positions=spec.max_positions),
                       eos_token_id=_eos_id(model, tokenizer), spec=spec, rope_regime=regime,
                       suppressed_ids=_suppressed_ids(model))


def _suppressed_ids(model: PreTrainedModel) -> list[int]:
    ids = getattr(model.generation_config, "suppress_tokens", None) if model.generation_config else None
    return sorted(set(ids or []))


def _eos_id(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int | None:
    eos = model.generation_config.eos_token_id if model.generation_config else None
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return eos if eos is not None else tokenizer.eos_token_id
