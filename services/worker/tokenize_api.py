"""vLLM's tokenizer endpoints, `POST /tokenize` and `POST /detokenize`, with its bodies: the
gateway checks the model name and relays them to any worker (create_app guards them with the
internal token, like every route the gateway calls). Tokenizing runs off the event loop."""

import asyncio

from fastapi import APIRouter, Request

from services.common.errors import InvalidRequest
from services.common.schemas import DetokenizeRequest, TokenizeChatRequest, TokenizeRequest
from services.worker.chat_template import chat_prompt_ids
from services.worker.engine.engine import Engine

router = APIRouter()


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    """{count, max_model_len, tokens, token_strs}: token_strs is null unless asked for."""
    engine = request.app.state.worker.require_engine()
    return await asyncio.to_thread(tokenized, engine, body)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    engine = request.app.state.worker.require_engine()
    vocab_size = len(engine.tokenizer)
    unknown = next((token for token in body.tokens if token >= vocab_size), None)
    if unknown is not None:
        raise InvalidRequest(f"token id {unknown} is not in the vocabulary of {vocab_size}", param="tokens")
    prompt = await asyncio.to_thread(engine.tokenizer.decode, body.tokens)
    return {"prompt": prompt}


def tokenized(engine: Engine, body: TokenizeRequest) -> dict:
    """Blocking. A prompt is encoded as vLLM does (special tokens added unless asked not to);
    messages go through the chat template generation uses."""
    if isinstance(body, TokenizeChatRequest):
        engine.check_text_fits(sum(len(m.content) for m in body.messages))
        tokens = chat_prompt_ids(engine.tokenizer, [m.model_dump() for m in body.messages],
                                 add_generation_prompt=body.add_generation_prompt)
    else:
        engine.check_text_fits(len(body.prompt))
        tokens = engine.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    token_strs = engine.tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
    return {"count": len(tokens), "max_model_len": engine.window, "tokens": tokens, "token_strs": token_strs}
