"""Tensors of the KV tensor API to and from their wire form (services.common.kv_tensor_schemas).
Pure: no FastAPI; blocking (base64 of megabytes, torch.load), so callers run it off the event loop.

Two encodings, both checked against the declared shape and dtype before anything is stored:
- "raw": the values' bytes, C order, little-endian. Nothing is unpickled.
- "torch": torch.save's bytes, the reference design's encoding. Loaded with
  torch.load(weights_only=True), whose unpickler builds tensors and plain containers only, after
  checking the zip archive: every member stored uncompressed (as torch.save writes it, so no
  zip bomb) and no bigger than what arrived. A worker can refuse it altogether
  (WORKER_KV_TENSOR_ALLOW_TORCH_SAVE=false).
"""

import base64
import binascii
import io
import math
import zipfile

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# torch.save's archive around the values: the pickle, version and byteorder records, zip headers
TORCH_SAVE_OVERHEAD_BYTES = 64 * 1024


class InvalidTensor(ValueError):
    """The data is not a tensor of the declared shape and dtype in the declared encoding."""


class TensorTooLarge(ValueError):
    """The tensor is over the per-tensor limit."""


def dtype_of(name: str) -> torch.dtype:
    dtype = DTYPES.get(name.removeprefix("torch."))
    if dtype is None:
        raise InvalidTensor(f"dtype {name!r} is not one of {sorted(DTYPES)}")
    return dtype


def decode_tensor(data: str, shape: list[int], dtype_name: str, encoding: str, *, max_bytes: int,
                  allow_torch_save: bool = True, name: str = "tensor") -> torch.Tensor:
    """The tensor, on the CPU, contiguous and owning exactly its own storage."""
    dtype = dtype_of(dtype_name)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > max_bytes:
        raise TensorTooLarge(f"{name}: {nbytes} bytes, over the limit of {max_bytes} bytes per tensor")
    if encoding == "raw":
        return _decode_raw(_b64(data, nbytes, name), shape, dtype, nbytes, name)
    if encoding != "torch":
        raise InvalidTensor(f"{name}: encoding must be 'torch' or 'raw'")
    if not allow_torch_save:
        raise InvalidTensor(f"{name}: this worker takes encoding 'raw' only (torch.save is turned off)")
    tensor = _decode_torch_save(_b64(data, nbytes + TORCH_SAVE_OVERHEAD_BYTES, name), name)
    if tensor.dtype != dtype or list(tensor.shape) != list(shape):
        raise InvalidTensor(f"{name}: the data holds a {str(tensor.dtype)} tensor of shape {list(tensor.shape)}, "
                            f"not the declared {dtype_name} {list(shape)}")
    return _owning(tensor)


def encode_tensor(tensor: torch.Tensor, encoding: str) -> dict:
    """{"data", "shape", "dtype", "encoding"}; `tensor` may be a view (only its values are sent)."""
    tensor = tensor.detach().to("cpu").contiguous()
    if encoding == "raw":
        raw = tensor.view(torch.uint8).numpy().tobytes()  # little-endian: the byte order of x86 and ARM
    else:
        buffer = io.BytesIO()
        torch.save(tensor.clone(), buffer)  # a clone: torch.save writes a view's whole storage
        raw = buffer.getvalue()
    return {"data": base64.b64encode(raw).decode("ascii"), "shape": list(tensor.shape),
            "dtype": str(tensor.dtype), "encoding": encoding}


def _b64(data: str, max_bytes: int, name: str) -> bytes:
    if len(data) > 4 * math.ceil(max_bytes / 3):  # refused before decoding megabytes
        raise InvalidTensor(f"{name}: data is longer than a tensor of the declared shape and dtype")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidTensor(f"{name}: data is not valid base64 ({exc})") from None


def _decode_raw(raw: bytes, shape: list[int], dtype: torch.dtype, nbytes: int, name: str) -> torch.Tensor:
    if len(raw) != nbytes:
        raise InvalidTensor(f"{name}: {len(raw)} bytes of data, but shape {shape} of {str(dtype)} "
                            f"needs {nbytes}")
    tensor = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)
    return tensor  # over its own bytearray: nothing else holds it


def _decode_torch_save(raw: bytes, name: str) -> torch.Tensor:
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, ValueError) as exc:
        raise InvalidTensor(f"{name}: data is not torch.save's format ({exc})") from None
    if any(m.compress_type != zipfile.ZIP_STORED for m in members) or sum(m.file_size for m in members) > len(raw):
        raise InvalidTensor(f"{name}: torch.save's archive must hold its members uncompressed")
    try:
        tensor = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure of a client's bytes is the client's 400
        raise InvalidTensor(f"{name}: torch.load(weights_only=True) refused the data "
                            f"({type(exc).__name__})") from None
    if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided or tensor.is_quantized:
        raise InvalidTensor(f"{name}: torch.save's data must hold one dense tensor")
    return tensor


def _owning(tensor: torch.Tensor) -> torch.Tensor:
    """Contiguous, with a storage of exactly its values (a saved view brings its whole storage)."""
    exact = tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    return tensor if exact and tensor.storage_offset() == 0 else tensor.contiguous().clone()

