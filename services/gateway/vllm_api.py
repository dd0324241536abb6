"""vLLM's server routes that users script against, beside /v1: the tokenizer (`POST /tokenize`,
`POST /detokenize`), `POST /reset_prefix_cache` and `GET /version`. Thin: the proxy calls workers."""

from importlib.metadata import version

from fastapi import APIRouter, Request
from starlette.responses import Response

from services.common.errors import ModelNotFound, UpstreamError
from services.common.schemas import DetokenizeRequest, TokenizeRequest
from services.gateway.openapi_docs import errors
from services.gateway.proxy import GatewayProxy

router = APIRouter(tags=["vLLM-compatible"])
RESET_RESPONSES = {200: {"description": "Every registered worker dropped its stateless (prefix cache) "
                                        "entries; conversations keep their KV."}} | errors(401, 408, 413, 502, 503)


def _proxy(request: Request) -> GatewayProxy:
    return request.app.state.proxy


def _check_model(proxy: GatewayProxy, model: str | None) -> None:
    if model is not None and model not in proxy.served_models():
        raise ModelNotFound(f"model '{model}' is not served here (see /v1/models)", param="model")


@router.post("/tokenize", response_model=None, responses=errors(400, 401, 404, 408, 413, 422, 502, 503))
async def tokenize(body: TokenizeRequest, request: Request) -> Response:
    """vLLM's body and answer: `{count, max_model_len, tokens, token_strs}`. `messages` are
    rendered with the chat template that /v1/chat/completions uses, so `count` is its prompt_tokens."""
    proxy = _proxy(request)
    _check_model(proxy, body.model)
    return await proxy.call_any("/tokenize", body.model_dump(exclude={"model"}, exclude_none=True))


@router.post("/detokenize", response_model=None, responses=errors(400, 401, 404, 408, 413, 422, 502, 503))
async def detokenize(body: DetokenizeRequest, request: Request) -> Response:
    """`{tokens: [ids]}` -> `{prompt: text}`."""
    proxy = _proxy(request)
    _check_model(proxy, body.model)
    return await proxy.call_any("/detokenize", {"tokens": body.tokens})


@router.post("/reset_prefix_cache", responses=RESET_RESPONSES)
async def reset_prefix_cache(request: Request) -> dict:
    """Asks every registered worker to forget its /v1 prefix cache (e.g. between benchmark runs:
    AIPerf's --reset-kv-cache). A worker that does not answer makes it a 502 naming it."""
    answers = await _proxy(request).post_everywhere("/internal/reset_prefix_cache")
    failed = {worker_id: why for worker_id, (_, why) in answers.items() if why is not None}
    if failed:
        raise UpstreamError("prefix cache not reset on " + "; ".join(f"{w}: {why}" for w, why in failed.items()))
    workers = {worker_id: body for worker_id, (body, _) in answers.items()}
    return {"num_workers": len(workers), "dropped_entries": sum(b["dropped_entries"] for b in workers.values()),
            "freed_bytes": sum(b["freed_bytes"] for b in workers.values()), "workers": workers}


@router.get("/version")
async def server_version() -> dict:
    return {"version": version("kvcache")}
