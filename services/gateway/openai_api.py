"""The OpenAI-compatible routes (`/v1/*`): thin; the work is in openai_relay."""

from typing import Annotated

from fastapi import APIRouter, Header, Request
from starlette.responses import Response

from services.common.errors import ModelNotFound
from services.common.schemas import SEQ_ID_PATTERN
from services.gateway.openai_format import ChatReply, TextReply, model_object
from services.gateway.openai_relay import complete
from services.gateway.openai_schemas import ChatCompletionRequest, CompletionRequest
from services.gateway.openapi_docs import (CHAT_RESPONSES, COMPLETION_RESPONSES, V1_ERRORS, Model, ModelList,
                                           errors)
from services.gateway.proxy import GatewayProxy
from services.gateway.session_key import SESSION_HEADER, chat_opening, prompt_opening, session_key

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])
SessionHeader = Annotated[str | None, Header(
    alias=SESSION_HEADER, pattern=SEQ_ID_PATTERN,
    description="Routing key: every request with the same key reaches the same worker "
                "(default: a hash of the model and the conversation's opening).")]


def _proxy(request: Request) -> GatewayProxy:
    return request.app.state.proxy


@router.post("/chat/completions", response_model=None, responses=CHAT_RESPONSES)
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           x_session_id: SessionHeader = None) -> Response:
    opening = chat_opening([(m.role, m.text()) for m in body.messages])
    key = session_key(x_session_id, body.model, opening)
    reply = ChatReply(model=body.model, include_usage=body.include_usage(), continuous_usage=body.continuous_usage(),
                      logprobs=bool(body.logprobs), n=body.num_choices())
    return await complete(_proxy(request), reply, body.for_worker(), key)


@router.post("/completions", response_model=None, responses=COMPLETION_RESPONSES)
async def completions(body: CompletionRequest, request: Request, x_session_id: SessionHeader = None) -> Response:
    key = session_key(x_session_id, body.model, prompt_opening(body.prompt_text()))
    reply = TextReply(model=body.model, include_usage=body.include_usage(), continuous_usage=body.continuous_usage(),
                      logprobs=body.logprobs is not None, n=body.num_choices(),
                      echo=body.prompt_text() if body.echo else None)
    return await complete(_proxy(request), reply, body.for_worker(), key)


@router.get("/models", responses=errors(401, 502, 503, openai=True))
async def list_models(request: Request) -> ModelList:
    served = _proxy(request).served_models()
    return ModelList.model_validate(
        {"object": "list", "data": [model_object(name, *model) for name, model in sorted(served.items())]})


@router.get("/models/{model_id:path}", responses=V1_ERRORS)
async def retrieve_model(model_id: str, request: Request) -> Model:
    served = _proxy(request).served_models()
    if model_id not in served:
        raise ModelNotFound(f"model '{model_id}' is not served here", param="model")
    return Model.model_validate(model_object(model_id, *served[model_id]))
