"""Domain errors and the one JSON error body: {"error": {"type", "message"}}."""

from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match


class ServiceError(Exception):
    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, *, retry_after_s: int | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        self.param = param  # the request field at fault, when there is one
        self.headers = headers

    def to_body(self) -> dict:
        return error_body(self.error_type, self.message)

    def response_headers(self) -> dict[str, str] | None:
        headers = dict(self.headers or {})
        if self.retry_after_s:
            headers["Retry-After"] = str(self.retry_after_s)
        return headers or None


class InvalidRequest(ServiceError):
    status_code = 400
    error_type = "invalid_request"


class ContextTooLong(ServiceError):
    status_code = 400
    error_type = "context_too_long"


class NotFound(ServiceError):
    status_code = 404
    error_type = "not_found"


class ModelNotFound(NotFound):
    error_type = "model_not_found"


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


class HTTPStatusError(ServiceError):
    """An error with a status decided elsewhere: Starlette's (404, 405), a worker's, a validation's."""

    def __init__(self, status_code: int, error_type: str, message: str, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.status_code = status_code
        self.error_type = error_type


def error_response(exc: ServiceError) -> JSONResponse:
    return JSONResponse(exc.to_body(), status_code=exc.status_code, headers=exc.response_headers())


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        message = "not a supported parameter" if err.get("type") == "extra_forbidden" else err.get("msg", "invalid")
        parts.append(f"{loc or 'body'}: {message}")
    return "; ".join(parts) or "invalid request"


def _validation_param(exc: RequestValidationError) -> str | None:
    """The first offending field, e.g. "messages.0.content" (None for a wholly invalid body)."""
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "header", "query", "path")]
        if loc:
            return ".".join(loc)
    return None


def as_service_error(exc: Exception) -> ServiceError:
    """Every exception a route can raise, as the one error type the renderers know."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, RequestValidationError):
        return HTTPStatusError(422, InvalidRequest.error_type, _validation_message(exc), param=_validation_param(exc))
    if isinstance(exc, StarletteHTTPException):
        error_type = "not_found" if exc.status_code == 404 else "http_error"
        return HTTPStatusError(exc.status_code, error_type, str(exc.detail), headers=getattr(exc, "headers", None))
    return ServiceError(f"{type(exc).__name__}: {exc}")


ErrorRenderer = Callable[[Request, ServiceError], Response]


def _render_default(_: Request, exc: ServiceError) -> Response:
    return error_response(exc)


def _allowed_methods(request: Request) -> list[str]:
    """Every method that some route of the app answers on this path."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "\0"})  # no method matches: path only
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


def install_error_handlers(app: FastAPI, render: ErrorRenderer = _render_default) -> None:
    """Domain errors, invalid requests, Starlette's HTTP errors and anything unexpected all leave
    through `render` (a service with another public error shape passes its own)."""

    async def on_error(request: Request, exc: Exception) -> Response:
        error = as_service_error(exc)
        if error.status_code == 405:  # Starlette names the methods of the first route of the path only
            error.headers = {**(error.headers or {}), "Allow": ", ".join(_allowed_methods(request))}
        return render(request, error)

    for exc_type in (ServiceError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(exc_type, on_error)


class SequenceConflict(Conflict):
    """Another request holds the sequence's turn (a concurrent request routed elsewhere), or the
    history changed under a compare-and-set."""

    error_type = "sequence_conflict"


class DuplicateTurn(Conflict):
    """The request's turn id (its Idempotency-Key) is already in the sequence's log: the body
    carries that turn's outcome instead of running it twice."""

    error_type = "duplicate_turn"

    def __init__(self, message: str, turn: dict) -> None:
        super().__init__(message)
        self.turn = turn

    def to_body(self) -> dict:
        body = super().to_body()
        body["error"]["turn"] = self.turn
        return body


class StoreUnavailable(Unavailable):
    error_type = "session_store_unavailable"


class Draining(Unavailable):
    """The worker is leaving: the gateway re-routes the request to the new owner."""

    error_type = "draining"


class NotReady(Unavailable):
    """The worker's model is not loaded (starting, or a restarted pod): the gateway re-routes."""

    error_type = "worker_not_ready"
