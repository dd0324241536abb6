"""Load a causal LM and its tokenizer off the event loop, wired to the packed KV attention."""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from services.worker.kv_store import KVLayout
from services.worker.model.attention import ATTN_IMPLEMENTATION
from services.worker.model.presets import resolve_model_path

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    layout: KVLayout
    eos_token_id: int | None


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":  # reduced precision is slower than fp32 on CPU (measured)
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_model(model_name: str, cache_dir: Path, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    path = resolve_model_path(model_name, cache_dir)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype,
                                                 attn_implementation=ATTN_IMPLEMENTATION)
    model.to(dev).eval()
    logger.info("loaded %s on %s (%s)", model_name, dev, torch_dtype)
    return LoadedModel(name=model_name, model=model, tokenizer=tokenizer,
                       layout=kv_layout(model, dev, torch_dtype),
                       eos_token_id=_eos_id(model, tokenizer))


def kv_layout(model: PreTrainedModel, device: torch.device, dtype: torch.dtype) -> KVLayout:
    cfg = model.config.get_text_config()
    num_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
    return KVLayout(num_layers=cfg.num_hidden_layers,
                    num_kv_heads=getattr(cfg, "num_key_value_heads", None) or num_heads,
                    head_dim=head_dim, dtype=dtype, device=device,
                    max_positions=cfg.max_position_embeddings)


def _eos_id(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int | None:
    eos = model.generation_config.eos_token_id if model.generation_config else None
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return eos if eos is not None else tokenizer.eos_token_id
