"""Tenants: with API keys, each key's `seq_id`s live in their own namespace, so one key can
neither read, continue, delete nor learn of another key's conversation.

A key is its own tenant unless GATEWAY_TENANTS_FILE (a JSON object, tenant name -> list of keys)
puts several keys in one tenant (a team's keys, a key being rotated). The gateway passes the
public seq_id to workers as an opaque internal id, a hash of (tenant, seq_id): the session store,
the KV and the ring only ever see that, and a worker names the public one in its events. Without
keys there is one namespace and seq_ids pass unchanged.
"""

import hashlib
import json
from pathlib import Path

from starlette.types import Scope

_SCOPE_KEY = "kvcache_tenant"  # in scope["state"], which is Starlette's request.state


def load_tenants(path: str) -> dict[bytes, str]:
    """"" -> {}; else the file's {tenant: [keys]} as key -> tenant. A key under two tenants, or a
    file that is not such an object: an error at start-up."""
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"GATEWAY_TENANTS_FILE: cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(keys, list) and all(isinstance(k, str) and k.strip()
                                                                            for k in keys) for keys in data.values()):
        raise ValueError("GATEWAY_TENANTS_FILE must hold a JSON object: tenant name -> list of API keys")
    tenants: dict[bytes, str] = {}
    for tenant, keys in data.items():
        for key in keys:
            if tenants.setdefault(key.strip().encode(), tenant) != tenant:
                raise ValueError(f"GATEWAY_TENANTS_FILE: a key is listed under two tenants ({tenant!r})")
    return tenants


def tenant_of(key: bytes, tenants: dict[bytes, str]) -> str:
    """The key's tenant name, or one derived from the key (never the key itself)."""
    return tenants.get(key) or "key:" + hashlib.sha256(key).hexdigest()[:24]


def set_tenant(scope: Scope, tenant: str) -> None:
    scope.setdefault("state", {})[_SCOPE_KEY] = tenant


def tenant_in(scope: Scope) -> str | None:
    return scope.get("state", {}).get(_SCOPE_KEY)


def internal_seq_id(tenant: str | None, seq_id: str) -> str:
    """What the cluster calls the tenant's seq_id: 41 characters of the seq_id alphabet."""
    if tenant is None:
        return seq_id
    return "t" + hashlib.sha256(f"{tenant}\0{seq_id}".encode()).hexdigest()[:40]
