"""Wire schemas of the per-(seq_id, layer) KV tensor API (`/kv/*` on the gateway and the workers).

The request and response shapes are the reference design's (ndminhvn/distributed-kv-cache): a
tensor travels as {"data": base64, "shape": [seq_len, num_heads, head_dim], "dtype":
"torch.float32"}, where data is torch.save's bytes (the reference's encoding, loaded here with
torch.load(weights_only=True) only) or, with "encoding": "raw", the tensor's bytes in C order and
little-endian (no unpickling at all). Size limits are the services' settings, not the schema's.
"""

import asyncio
from typing import Annotated, Any, Literal, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.common.schemas import SEQ_ID_PATTERN, NotBoolOrString

Model = TypeVar("Model", bound=BaseModel)

MAX_LAYERS = 1024  # layer indexes 0..1023: more than any model has
MAX_DIM = 2**31 - 1

DTypeName = Literal["torch.float32", "torch.float16", "torch.bfloat16", "float32", "float16", "bfloat16"]
Encoding = Literal["torch", "raw"]
Layer = Annotated[int, Field(ge=0, lt=MAX_LAYERS), NotBoolOrString]
Dim = Annotated[int, Field(ge=1, le=MAX_DIM), NotBoolOrString]
SeqId = Annotated[str, Field(pattern=SEQ_ID_PATTERN)]


class TensorData(BaseModel):
    """One tensor, [seq_len, num_heads, head_dim]; axis 0 is the sequence axis (appends grow it)."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="base64 of torch.save's bytes (encoding torch) or of the raw "
                                  "little-endian C-order values (encoding raw)")
    shape: list[Dim] = Field(min_length=3, max_length=3, description="[seq_len, num_heads, head_dim]")
    dtype: DTypeName
    encoding: Encoding = "torch"


class KVWriteRequest(BaseModel):
    """POST /kv/put (replaces the layer's K and V) and POST /kv/append (adds positions at the end)."""

    model_config = ConfigDict(extra="forbid")

    seq_id: SeqId
    layer: Layer
    k: TensorData
    v: TensorData


class KVGetRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seq_id: SeqId
    layer: Layer
    encoding: Encoding = Field("torch", description="how the answer's k and v are encoded")


class TensorPair(BaseModel):
    k: list[int]
    v: list[int]


class DTypePair(BaseModel):
    k: str
    v: str


class KVWriteResponse(BaseModel):
    """`seq_len`: the layer's length after the write; shapes and dtypes: of the tensors sent."""

    status: Literal["ok"]
    seq_id: str
    layer: int
    seq_len: int
    tensor_shapes: TensorPair
    tensor_dtypes: DTypePair
    worker_id: str


class KVGetResponse(BaseModel):
    seq_id: str
    layer: int
    seq_len: int
    k: TensorData
    v: TensorData
    worker_id: str


class KVLengthResponse(BaseModel):
    """`seq_len` is 0 for a (seq_id, layer) that holds nothing (as in the reference design)."""

    seq_id: str
    layer: int
    seq_len: int
    worker_id: str


class KVDeleteResponse(BaseModel):
    status: Literal["evicted"]
    seq_id: str
    num_layers: int
    worker_id: str


async def parsed_body(request: Request, model: type[Model]) -> Model:
    """The request's JSON body as `model`, parsed and validated in a worker thread: a body of
    megabytes of base64 never blocks the event loop (FastAPI's own parsing runs on it). Invalid:
    the 422 that FastAPI's validation gives."""
    raw = await request.body()
    try:
        return await asyncio.to_thread(model.model_validate_json, raw)
    except ValidationError as exc:
        errors = [error | {"loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


def body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` documenting `model` as the JSON body of a route that reads it with
    parsed_body (its sub-models inlined: the schema stands alone)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inlined(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            return inlined(defs[ref.removeprefix("#/$defs/")]) if ref.startswith("#/$defs/") else \
                {key: inlined(value) for key, value in node.items()}
        return [inlined(item) for item in node] if isinstance(node, list) else node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inlined(schema)}}}}
