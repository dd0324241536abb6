"""Builds the worker's lower KV tiers from its settings (README "KV tiers")."""

import hashlib
import logging
import os
from pathlib import Path

import torch

from services.worker.kv.lower import LowerTiers, TierObserver
from services.worker.kv.store import KVLayout
from services.worker.kv.tiers import DiskTier, HostTier, open_shared_store

logger = logging.getLogger(__name__)


def weights_revision(model: torch.nn.Module) -> str:
    """A digest of samples of the weights: KV from another build of the same name (a preset built
    with other random weights, a fine-tune saved over a path) never matches."""
    params = list(model.parameters())
    h = hashlib.blake2b(digest_size=8)
    for p in (params[0], params[len(params) // 2], params[-1]):
        sample = p.detach().reshape(-1)[:4096].to("cpu", torch.float32)
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def host_budget(settings, layout: KVLayout) -> int:
    """-1 (automatic): a quarter of RAM on CUDA; on CPU device memory is RAM already, so one
    model window of KV (what an eviction passes down on its way to disk)."""
    window = layout.max_positions * layout.bytes_per_token
    if settings.kv_host_bytes >= 0:
        return settings.kv_host_bytes
    if layout.device.type == "cuda":
        return max(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4, window)
    return window


def open_lower_tiers(settings, layout: KVLayout, fp: dict, observer: TierObserver | None) -> LowerTiers | None:
    """Blocking (directory scans, connections): at start-up, off the event loop."""
    if not (settings.enable_kv_reuse and settings.kv_tiers):
        return None
    host = HostTier(host_budget(settings, layout), pin=layout.device.type == "cuda")
    disk = DiskTier(Path(settings.kv_disk_dir).expanduser() / _model_dir(fp), settings.kv_disk_bytes) \
        if settings.kv_disk_bytes else None
    shared = open_shared_store(settings.kv_shared_url, settings.kv_shared_ttl_s, settings.kv_shared_bytes)
    logger.info("KV tiers: host %.0f MiB, disk %s, shared %s", host.budget_bytes / 2**20,
                f"{settings.kv_disk_bytes / 2**30:.1f} GiB in {disk.directory}" if disk else "off",
                settings.kv_shared_url or "off")
    return LowerTiers(layout, fp, host, disk, shared, settings.kv_tier_write_queue, observer)


def _model_dir(fp: dict) -> str:
    """The disk tier's subdirectory per model: a worker restarted with another model starts
    empty instead of adopting (and evicting by budget) chunks it can never use."""
    return hashlib.blake2b(repr(sorted(fp.items())).encode(), digest_size=8).hexdigest()
