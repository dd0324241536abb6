"""POST /completions: stateless (OpenAI-style) generation, sent by the gateway (create_app guards
it with the internal token: workers are not public).

No seq_id and no session store: the request's KV entry is pure cache. The engine starts from the
longest cached prefix of the prompt (automatic prefix caching) and keeps the result for the next
request that shares it. The response is /generate's: SSE events start/token/done/error, or with
`stream: false` the GenerateResult; the events' seq_id field carries the request_id. With n > 1,
the choices share the prompt's KV (services.worker.choices).
"""

import asyncio
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from services.common.errors import InvalidRequest
from services.common.event_stream import EventStream
from services.common.schemas import WorkerCompletionRequest
from services.worker.chat_template import chat_prompt_ids
from services.worker.choices import ChoiceGroup
from services.worker.engine.engine import Engine
from services.worker.engine.sequence import SamplingParams
from services.worker.streams import RequestHandle, collect_result, counted, start_request, stream_events

router = APIRouter()


@router.post("/completions")
async def completions(body: WorkerCompletionRequest, request: Request):
    state = request.app.state.worker
    engine = state.require_serving()
    body.check_min_tokens(body.max_tokens)
    engine.check_token_ids(body.stop_token_ids, "stop_token_ids")
    prompt_ids = await asyncio.to_thread(prompt_token_ids, engine, body)
    if not prompt_ids:
        raise InvalidRequest("the prompt encodes to no tokens")
    params = SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                            seed=body.seed, stop=tuple(body.stop), prompt_logprobs=body.prompt_logprobs,
                            **body.sampling_kwargs())
    name = body.request_id or uuid.uuid4().hex
    if body.n > 1:
        handle = ChoiceGroup(engine, name, prompt_ids, params, body.n)
        start = await counted(state.metrics.completion_requests, handle.start())
    else:
        handle = RequestHandle.stateless(engine, name, prompt_ids, params)
        start = await counted(state.metrics.completion_requests, start_request(handle))
    if not body.stream:
        return JSONResponse(await collect_result(handle))
    return EventStream(stream_events(handle, start))


def prompt_token_ids(engine: Engine, body: WorkerCompletionRequest) -> list[int]:
    """Blocking (tokenization): `messages` through the chat template, or the raw `prompt`."""
    if body.messages is None:
        return engine.encode(body.prompt)
    engine.check_text_fits(sum(len(m.content) for m in body.messages))
    return chat_prompt_ids(engine.tokenizer, [m.model_dump() for m in body.messages])
