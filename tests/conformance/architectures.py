"""Tiny seeded models of every architecture the conformance suite covers, built from config
classes only (no downloads): 2 layers, small widths, windows small enough to cross in a short
test. Each is saved and loaded back through `from_pretrained`, like any Hugging Face model."""

from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

VOCAB = 320
WINDOW = 12  # sliding / chunked window: the tests' contexts run well past it
MAX_POSITIONS = 256
LONGROPE_ORIGINAL = 48  # LongRoPE's original window: a short test crosses it

_LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS)


@dataclass(frozen=True)
class Arch:
    name: str
    config_class: str
    kwargs: dict = field(default_factory=dict)
    refused: str | None = None  # refused at load, with this feature in the error


def _longrope_factors(n: int, scale: float) -> list[float]:
    return [1.0 + scale * i / n for i in range(n)]


ARCHITECTURES = [
    Arch("llama", "LlamaConfig", dict(_LLAMA_LIKE)),
    Arch("qwen2", "Qwen2Config", dict(_LLAMA_LIKE)),
    Arch("qwen3", "Qwen3Config", dict(_LLAMA_LIKE, head_dim=16)),
    Arch("mistral", "MistralConfig", dict(_LLAMA_LIKE, sliding_window=WINDOW)),
    Arch("mixtral", "MixtralConfig", dict(_LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2)),
    Arch("qwen2_moe", "Qwen2MoeConfig", dict(_LLAMA_LIKE, num_experts=4, num_experts_per_tok=2,
                                             moe_intermediate_size=32, shared_expert_intermediate_size=32)),
    Arch("qwen3_moe", "Qwen3MoeConfig", dict(_LLAMA_LIKE, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                             moe_intermediate_size=32)),
    Arch("gemma2", "Gemma2Config", dict(_LLAMA_LIKE, head_dim=16, sliding_window=WINDOW,
                                        attn_logit_softcapping=5.0, final_logit_softcapping=30.0,
                                        query_pre_attn_scalar=24)),
    Arch("gemma3", "Gemma3TextConfig", dict(_LLAMA_LIKE, head_dim=16, sliding_window=WINDOW,
                                            sliding_window_pattern=2, query_pre_attn_scalar=24,
                                            layer_types=["sliding_attention", "full_attention"])),
    Arch("phi3", "Phi3Config", dict(_LLAMA_LIKE, sliding_window=WINDOW, pad_token_id=0)),
    Arch("phi3_longrope", "Phi3Config", dict(
        _LLAMA_LIKE, pad_token_id=0, original_max_position_embeddings=LONGROPE_ORIGINAL,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "short_factor": _longrope_factors(8, 0.5), "long_factor": _longrope_factors(8, 4.0),
                         "original_max_position_embeddings": LONGROPE_ORIGINAL})),
    Arch("gpt_oss", "GptOssConfig", dict(_LLAMA_LIKE, head_dim=16, sliding_window=WINDOW, num_local_experts=4,
                                         num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"])),
    Arch("deepseek_v3", "DeepseekV3Config", dict(
        _LLAMA_LIKE, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=12, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        moe_intermediate_size=32, first_k_dense_replace=1)),
    Arch("deepseek_v2", "DeepseekV2Config", dict(
        _LLAMA_LIKE, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=12, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        moe_intermediate_size=32, first_k_dense_replace=1)),
    Arch("falcon", "FalconConfig", dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_kv_heads=2, new_decoder_architecture=True,
                                        max_position_embeddings=MAX_POSITIONS)),
    Arch("stablelm", "StableLmConfig", dict(_LLAMA_LIKE)),
    Arch("gpt_neox", "GPTNeoXConfig", dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                           num_hidden_layers=2, num_attention_heads=4,
                                           max_position_embeddings=MAX_POSITIONS)),
    Arch("opt", "OPTConfig", dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                  num_attention_heads=4, word_embed_proj_dim=64,
                                  max_position_embeddings=MAX_POSITIONS)),
    Arch("gptj", "GPTJConfig", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                                    n_positions=MAX_POSITIONS)),
    Arch("phi", "PhiConfig", dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=MAX_POSITIONS)),
    Arch("starcoder2", "Starcoder2Config", dict(_LLAMA_LIKE, sliding_window=WINDOW)),
    Arch("gpt_bigcode", "GPTBigCodeConfig", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                                 n_positions=MAX_POSITIONS)),
    Arch("olmo2", "Olmo2Config", dict(_LLAMA_LIKE)),
    Arch("cohere", "CohereConfig", dict(_LLAMA_LIKE)),
    Arch("granite", "GraniteConfig", dict(_LLAMA_LIKE)),
    Arch("smollm3", "SmolLM3Config", dict(_LLAMA_LIKE, pad_token_id=0)),
    # Llama-4: chunked attention on the RoPE layers; temperature tuning on the NoPE layers, with a
    # floor_scale small enough that the tests' positions change the scale (released: 8192)
    Arch("llama4", "Llama4TextConfig", dict(_LLAMA_LIKE, head_dim=16, attention_chunk_size=WINDOW,
                                            num_local_experts=2, intermediate_size_mlp=96, interleave_moe_layer_step=1,
                                            no_rope_layers=[1, 0], floor_scale=16, attn_scale=0.5)),
    Arch("qwen3_next", "Qwen3NextConfig", dict(_LLAMA_LIKE, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                               moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                               linear_num_value_heads=4, linear_num_key_heads=2,
                                               linear_key_head_dim=16, linear_value_head_dim=16,
                                               layer_types=["linear_attention", "full_attention"]),
         refused="linear_attention"),
    Arch("llama_dynamic_rope", "LlamaConfig", dict(_LLAMA_LIKE, rope_parameters={
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}), refused="dynamic RoPE"),
    Arch("bloom", "BloomConfig", dict(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4),
         refused="never reaches the engine's KV path"),
    Arch("mpt", "MptConfig", dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, max_seq_len=MAX_POSITIONS),
         refused="ALiBi"),
    Arch("falcon_alibi", "FalconConfig", dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, alibi=True, max_position_embeddings=MAX_POSITIONS),
         refused="ALiBi"),
]
SERVED = [arch for arch in ARCHITECTURES if arch.refused is None]
REFUSED = [arch for arch in ARCHITECTURES if arch.refused is not None]


def build(arch: Arch, path: Path, seed: int = 0) -> Path:
    """Save a seeded random model of `arch` and a byte tokenizer with its vocabulary to `path`."""
    from services.worker.model.presets import build_byte_tokenizer

    config = getattr(transformers, arch.config_class)(**arch.kwargs, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    config.initializer_range = 0.2  # logits far apart: greedy choices are not near-ties
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    build_byte_tokenizer(VOCAB).save_pretrained(path)
    return path
