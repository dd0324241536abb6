"""The KV tensor API's tier: sequences the tensor store's byte budget evicts are written to the
shared KV tier (WORKER_KV_SHARED_URL) and read back on their next use, so the API holds more
than a worker's memory, and whichever worker owns the seq_id later finds them.

One safetensors entry per (seq_id, layer) (tensors `k` and `v`, metadata naming both, checked on
read), and one per sequence listing its layers. Keys are digests of the seq_id (`t` + hex: never
an engine chunk's key, which is hex only). Pure: torch, safetensors, the store given.
"""

import hashlib
import json

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from services.worker.kv.chunks import ChunkRejected, read_metadata


class TensorTier:
    def __init__(self, shared):
        self.shared = shared  # services.worker.kv.tiers.FsspecStore | RedisStore

    @staticmethod
    def _key(seq_id: str, layer: int | None) -> str:
        name = f"{seq_id}\0{'layers' if layer is None else layer}"
        return "t" + hashlib.blake2b(name.encode(), digest_size=16).hexdigest()

    def save(self, seq_id: str, layers: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Replaces what the tier holds for the sequence (K and V: `[seq_len, heads, dim]`)."""
        for layer, (k, v) in layers.items():
            meta = {"seq_id": seq_id, "layer": str(layer)}
            self.shared.put(self._key(seq_id, layer), st_save({"k": k.contiguous(), "v": v.contiguous()}, metadata=meta))
        self.shared.put(self._key(seq_id, None), json.dumps({"seq_id": seq_id, "layers": sorted(layers)}).encode())

    def load(self, seq_id: str) -> dict[int, tuple[torch.Tensor, torch.Tensor]] | None:
        """The sequence's layers, or None if the tier has none of them whole."""
        index = self.shared.get(self._key(seq_id, None))
        if index is None:
            return None
        try:
            listed = json.loads(index)
            if listed["seq_id"] != seq_id:
                return None
            layers = {int(layer): self._load_layer(seq_id, int(layer)) for layer in listed["layers"]}
        except (ValueError, KeyError, TypeError, SafetensorError):
            return None
        return layers if all(kv is not None for kv in layers.values()) else None

    def _load_layer(self, seq_id: str, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        raw = self.shared.get(self._key(seq_id, layer))
        if raw is None:
            return None
        try:
            meta = read_metadata(raw)
        except ChunkRejected:
            return None
        if meta.get("seq_id") != seq_id or meta.get("layer") != str(layer):
            return None
        tensors = st_load(raw)
        return tensors["k"], tensors["v"]

    def forget(self, seq_id: str, layers: list[int] | None = None) -> None:
        """Removes the sequence (every layer its index lists, and `layers`)."""
        known = set(layers or [])
        index = self.shared.get(self._key(seq_id, None))
        if index is not None:
            try:
                known |= set(json.loads(index)["layers"])
            except (ValueError, KeyError, TypeError):
                pass
        for layer in known:
            self.shared.remove(self._key(seq_id, layer))
        self.shared.remove(self._key(seq_id, None))
