"""The reference design's per-(seq_id, layer) KV tensor API on a worker: POST /kv/put, /kv/get,
/kv/append, GET /kv/{seq_id}/{layer}/length and DELETE /kv/{seq_id}. Thin: the codec and the store
(services/worker/kv/tensor_codec.py, tensors.py) do the work, in a worker thread (base64 of
megabytes and torch ops never run on the event loop). create_app guards these routes with the
internal token: only the gateway, which applies API keys and tenants to seq_id, calls them."""

import asyncio
from typing import Annotated

from fastapi import APIRouter, Path, Request
from pydantic_core import to_json
from starlette.responses import Response

from services.common.errors import InvalidRequest, NotFound, ServiceError
from services.common.kv_tensor_schemas import (MAX_LAYERS, KVDeleteResponse, KVGetRequest, KVGetResponse,
                                               KVLengthResponse, KVWriteRequest, KVWriteResponse, TensorData,
                                               body_doc, parsed_body)
from services.common.schemas import SEQ_ID_PATTERN
from services.worker.kv.tensor_codec import InvalidTensor, TensorTooLarge, decode_tensor, encode_tensor
from services.worker.kv.tensors import KVTensorStore, OverBudget, ShapeMismatch

router = APIRouter(prefix="/kv", tags=["KV tensors"])
SeqIdPath = Annotated[str, Path(pattern=SEQ_ID_PATTERN)]
LayerPath = Annotated[int, Path(ge=0, lt=MAX_LAYERS)]


class KVTooLarge(ServiceError):
    status_code = 413
    error_type = "kv_too_large"


class InvalidTensorError(InvalidRequest):
    error_type = "invalid_tensor"


class KVShapeMismatch(InvalidRequest):
    error_type = "kv_shape_mismatch"


def new_store(settings) -> KVTensorStore:
    return KVTensorStore(settings.kv_tensor_bytes, settings.kv_tensor_max_bytes)


def _service_error(exc: Exception) -> ServiceError:
    """The codec's and the store's errors, mapped once."""
    if isinstance(exc, (TensorTooLarge, OverBudget)):
        return KVTooLarge(str(exc))
    if isinstance(exc, ShapeMismatch):
        return KVShapeMismatch(str(exc))
    return InvalidTensorError(str(exc))


async def _call(function, *args):
    try:
        return await asyncio.to_thread(function, *args)
    except (InvalidTensor, TensorTooLarge, OverBudget, ShapeMismatch) as exc:
        raise _service_error(exc) from None


def _decode(settings, tensor: TensorData, name: str):
    return decode_tensor(tensor.data, tensor.shape, tensor.dtype, tensor.encoding,
                         max_bytes=settings.kv_tensor_max_bytes,
                         allow_torch_save=settings.kv_tensor_allow_torch_save, name=name)


def _write(settings, store: KVTensorStore, body: KVWriteRequest, append: bool) -> dict:
    k, v = _decode(settings, body.k, "k"), _decode(settings, body.v, "v")
    seq_len = (store.append if append else store.put)(body.seq_id, body.layer, k, v)
    return {"status": "ok", "seq_id": body.seq_id, "layer": body.layer, "seq_len": seq_len,
            "tensor_shapes": {"k": list(k.shape), "v": list(v.shape)},
            "tensor_dtypes": {"k": str(k.dtype), "v": str(v.dtype)}, "worker_id": settings.worker_id}


def _read(settings, store: KVTensorStore, body: KVGetRequest) -> bytes | None:
    """The response's JSON (megabytes: made here, off the loop), or None if nothing is stored."""
    found = store.get(body.seq_id, body.layer)
    if found is None:
        return None
    k, v = found
    return to_json({"seq_id": body.seq_id, "layer": body.layer, "seq_len": k.shape[0],
                    "k": encode_tensor(k, body.encoding), "v": encode_tensor(v, body.encoding),
                    "worker_id": settings.worker_id})  # pydantic's encoder: 15x json.dumps on base64


def _parts(request: Request):
    return request.app.state.worker.settings, request.app.state.kv_tensors


@router.post("/put", response_model=KVWriteResponse, openapi_extra=body_doc(KVWriteRequest))
async def put(request: Request) -> dict:
    """Stores the layer's K and V, replacing what it held."""
    return await _call(_write, *_parts(request), await parsed_body(request, KVWriteRequest), False)


@router.post("/append", response_model=KVWriteResponse, openapi_extra=body_doc(KVWriteRequest))
async def append(request: Request) -> dict:
    """Adds positions at the end of the layer's K and V (a put if it holds nothing)."""
    return await _call(_write, *_parts(request), await parsed_body(request, KVWriteRequest), True)


@router.post("/get", response_model=None, responses={200: {"model": KVGetResponse}},
             openapi_extra=body_doc(KVGetRequest))
async def get(request: Request) -> Response:
    body = await parsed_body(request, KVGetRequest)
    content = await _call(_read, *_parts(request), body)
    if content is None:
        raise NotFound(f"no KV for this seq_id at layer {body.layer}")  # the gateway's client knows its seq_id
    return Response(content, media_type="application/json")


@router.get("/{seq_id}/{layer}/length", response_model=KVLengthResponse)
async def length(seq_id: SeqIdPath, layer: LayerPath, request: Request) -> dict:
    settings, store = _parts(request)
    seq_len = await asyncio.to_thread(store.length, seq_id, layer)  # the lock may be held by a large write
    return {"seq_id": seq_id, "layer": layer, "seq_len": seq_len, "worker_id": settings.worker_id}


@router.delete("/{seq_id}", response_model=KVDeleteResponse)
async def delete(seq_id: SeqIdPath, request: Request) -> dict:
    settings, store = _parts(request)
    num_layers = await asyncio.to_thread(store.delete, seq_id)
    return {"status": "evicted", "seq_id": seq_id, "num_layers": num_layers, "worker_id": settings.worker_id}
