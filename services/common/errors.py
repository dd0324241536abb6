"""Domain errors and the one JSON error body: {"error": {"type", "message"}}."""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class ServiceError(Exception):
    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, *, retry_after_s: int | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s

    def to_body(self) -> dict:
        return error_body(self.error_type, self.message)


class InvalidRequest(ServiceError):
    status_code = 400
    error_type = "invalid_request"


class ContextTooLong(ServiceError):
    status_code = 400
    error_type = "context_too_long"


class NotFound(ServiceError):
    status_code = 404
    error_type = "not_found"


class Conflict(ServiceError):
    status_code = 409
    error_type = "conflict"


class Overloaded(ServiceError):
    status_code = 429
    error_type = "overloaded"


class Unavailable(ServiceError):
    status_code = 503
    error_type = "unavailable"


class UpstreamError(ServiceError):
    status_code = 502
    error_type = "upstream_error"


def error_body(error_type: str, message: str) -> dict:
    return {"error": {"type": error_type, "message": message}}


def error_response(exc: ServiceError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
    return JSONResponse(exc.to_body(), status_code=exc.status_code, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    async def on_service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc)

    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body("invalid_request", _validation_message(exc)), status_code=422)

    async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error_type = "not_found" if exc.status_code == 404 else "http_error"
        return JSONResponse(error_body(error_type, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body("internal_error", f"{type(exc).__name__}: {exc}"), status_code=500)

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)


class SequenceConflict(Conflict):
    """Another request holds the sequence's turn (a concurrent request routed elsewhere), or the
    history changed under a compare-and-set."""

    error_type = "sequence_conflict"


class StoreUnavailable(Unavailable):
    error_type = "session_store_unavailable"


class Draining(Unavailable):
    """The worker is leaving: the gateway re-routes the request to the new owner."""

    error_type = "draining"


class NotReady(Unavailable):
    """The worker's model is not loaded (starting, or a restarted pod): the gateway re-routes."""

    error_type = "worker_not_ready"
