"""What the engine's packed attention must honour for a loaded model, and what it refuses.

Decided at start-up from the config and from one probe forward: a recording attention function
is swapped in, a few tokens are run, and every call is checked. A layer whose attention never
reaches the function (ALiBi computed in BLOOM's own code, linear-attention layers), an attention
bias passed as a mask, or an argument the engine does not know is refused with one error naming
the model type and the feature, never served wrong.
"""

import threading
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, PreTrainedModel

# Attention kwargs the packed attention honours, or that carry nothing for it.
HONOURED_KWARGS = {"dropout", "scaling", "sliding_window", "softcap", "s_aux"}
INERT_KWARGS = {"position_ids", "cache_position", "use_cache", "output_attentions", "output_router_logits",
                "output_hidden_states", "return_dict", "is_causal", "logits_to_keep"}
LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}
_PROBE = "kvcache_probe"


class UnsupportedModel(Exception):
    def __init__(self, model_type: str, feature: str):
        super().__init__(f"model type '{model_type}' is not supported: {feature}")
        self.model_type, self.feature = model_type, feature


@dataclass(frozen=True)
class AttentionSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int      # the wider of K's and V's (MLA: V is narrower and padded in the KV buffer)
    max_positions: int
    chunk_sizes: dict[int, int] = field(default_factory=dict)  # layer -> chunked-attention size
    longrope_original: int | None = None  # LongRoPE's original window, where its factors switch
    # Llama-4's attention temperature tuning on NoPE layers: layer -> (floor_scale, attn_scale).
    temperature_tuning: dict[int, tuple[int, float]] = field(default_factory=dict)
    max_step_tokens: int | None = None  # a packed step of more tokens would be computed wrong

    def check_step(self, num_tokens: int) -> None:
        if self.max_step_tokens is not None and num_tokens > self.max_step_tokens:
            raise ValueError(f"a step of {num_tokens} tokens exceeds this model's {self.max_step_tokens}")


@dataclass
class _Call:
    key: tuple
    value: tuple
    kwargs: dict
    mask: bool
    causal: bool


def inspect_model(model: PreTrainedModel) -> AttentionSpec:
    """The model's attention spec, or UnsupportedModel."""
    cfg = model.config.get_text_config()
    model_type = cfg.model_type
    _check_config(cfg, model_type)
    calls = _probe(model, model_type)
    num_layers = cfg.num_hidden_layers
    missing = sorted(set(range(num_layers)) - set(calls))
    if missing:
        raise UnsupportedModel(model_type, f"the attention of layer(s) {missing} never reaches the engine's "
                                           "KV path (computed in the model's own code)")
    shapes = {(c.key[1], c.key[3], c.value[3]) for c in calls.values()}
    if len(shapes) != 1:
        raise UnsupportedModel(model_type, f"layers differ in KV heads or head sizes: {sorted(shapes)}")
    for layer, call in sorted(calls.items()):
        _check_call(call, layer, model_type)
    (kv_heads, k_dim, v_dim), = shapes
    tuning = _temperature_tuning(cfg)
    return AttentionSpec(num_layers=num_layers, num_kv_heads=kv_heads, head_dim=max(k_dim, v_dim),
                         max_positions=_max_positions(cfg, model_type), chunk_sizes=_chunk_sizes(cfg),
                         longrope_original=_longrope_original(cfg, model_type), temperature_tuning=tuning,
                         max_step_tokens=min((f - 1 for f, _ in tuning.values()), default=None))


def _check_config(cfg, model_type: str) -> None:
    unknown = sorted(set(getattr(cfg, "layer_types", None) or []) - LAYER_TYPES)
    if unknown:
        raise UnsupportedModel(model_type, f"layer types {unknown} keep state outside the KV cache")
    if getattr(cfg, "alibi", False) or getattr(getattr(cfg, "attn_config", None), "alibi", False):
        raise UnsupportedModel(model_type, "ALiBi position bias")
    for params in _rope_parameter_sets(cfg):
        if "dynamic" in str(params.get("rope_type", "")):
            raise UnsupportedModel(model_type, "dynamic RoPE scaling (frequencies follow the batch's longest "
                                               "sequence)")


def _check_call(call: _Call, layer: int, model_type: str) -> None:
    if call.mask:
        raise UnsupportedModel(model_type, f"layer {layer} passes an attention mask or bias (e.g. ALiBi) that the "
                                           "engine does not apply")
    if not call.causal:
        raise UnsupportedModel(model_type, f"layer {layer} is bidirectional")
    unknown = sorted(k for k, v in call.kwargs.items()
                     if k not in HONOURED_KWARGS | INERT_KWARGS and v not in (None, False, 0))
    if unknown:
        raise UnsupportedModel(model_type, f"layer {layer} asks its attention for {unknown}")
    if call.kwargs.get("dropout"):
        raise UnsupportedModel(model_type, "attention dropout in eval mode")


def _probe(model: PreTrainedModel, model_type: str) -> dict[int, _Call]:
    calls: dict[int, _Call] = {}

    def record(module, query, key, value, attention_mask, **kwargs):
        calls[module.layer_idx] = _Call(tuple(key.shape), tuple(value.shape), kwargs,
                                        attention_mask is not None, getattr(module, "is_causal", True))
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None

    AttentionInterface.register(_PROBE, record)
    previous = model.config._attn_implementation
    device = next(model.parameters()).device
    try:
        model.set_attn_implementation(_PROBE)
        _in_own_thread(lambda: model(input_ids=torch.tensor([[1, 2, 3]], device=device),
                                     position_ids=torch.tensor([[0, 1, 2]], device=device), use_cache=False))
    except Exception as exc:  # noqa: BLE001 - any failure here means the model cannot run on the engine
        raise UnsupportedModel(model_type, f"its attention cannot run on the engine's KV path ({exc!r})") from exc
    finally:
        model.set_attn_implementation(previous)
    return calls


def _in_own_thread(forward) -> None:
    """Run the probe on a thread that then exits. A CPU forward leaves an OpenMP thread team
    behind on the thread that ran it; a second team beside the engine thread's made every op of
    the engine's forwards 2-4x slower on 2 cores (measured: 30 -> 40 ms per gpt2-small decode step)."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with torch.inference_mode():
                forward()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="model-probe")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def _max_positions(cfg, model_type: str) -> int:
    value = getattr(cfg, "max_position_embeddings", None)
    if not value:
        raise UnsupportedModel(model_type, "the config gives no max_position_embeddings (the context window)")
    return value


def _chunk_sizes(cfg) -> dict[int, int]:
    layer_types = getattr(cfg, "layer_types", None) or []
    return {i: cfg.attention_chunk_size for i, t in enumerate(layer_types) if t == "chunked_attention"}


def _temperature_tuning(cfg) -> dict[int, tuple[int, float]]:
    """Llama-4 scales the queries of its NoPE layers by a function of each token's position, but
    transformers takes that position from the cache length plus the index in the forward's row
    (no cache here: the index in the packed row). While a step packs fewer than `floor_scale`
    tokens that scale is exactly 1, and the attention applies the right one per position; the
    runner refuses larger steps (AttentionSpec.max_step_tokens)."""
    if not getattr(cfg, "attn_temperature_tuning", False):
        return {}
    return {i: (cfg.floor_scale, cfg.attn_scale) for i, rope in enumerate(getattr(cfg, "no_rope_layers", None) or [])
            if not rope}


def _rope_parameter_sets(cfg) -> list[dict]:
    params = getattr(cfg, "rope_parameters", None) or {}
    if params and all(isinstance(v, dict) for v in params.values()):  # one set per layer type
        return list(params.values())
    return [params] if params else []


def _longrope_original(cfg, model_type: str) -> int | None:
    sets = _rope_parameter_sets(cfg)
    longrope = [p for p in sets if p.get("rope_type") == "longrope"]
    if not longrope:
        return None
    if len(sets) > 1:
        raise UnsupportedModel(model_type, "LongRoPE per layer type")
    return int(longrope[0].get("original_max_position_embeddings")
               or getattr(cfg, "original_max_position_embeddings", None) or cfg.max_position_embeddings)
