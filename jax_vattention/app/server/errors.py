"""OpenAI's error shape on every error path of the server, FastAPI's and Starlette's own included.

OpenAI answers every error with ``{"error": {"message", "type", "param", "code"}}``; its client
reads ``message`` from there (and ``param`` names the request field at fault). FastAPI's
defaults answer ``{"detail": ...}`` for an unknown route (404), a wrong method (405), a
validation error (422) and an exception (500, plain text): :func:`install_error_handlers`
replaces each of them.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A request the server refuses or could not serve: an HTTP status and OpenAI's error fields.

    Parameters
    ----------
    status : HTTP status
    message : what went wrong and, where it helps, what to do
    param : the request field at fault (``"max_tokens"``, ``"messages.0.content"``), or None
    code : a short machine-readable code (``"model_not_found"``), or None
    headers : extra response headers (``Retry-After`` on a 429)
    """

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    @property
    def kind(self) -> str:
        """OpenAI's error ``type`` for the status."""
        if self.status == 429:
            return "rate_limit_error"
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers=self.headers)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_error(errors: list[dict]) -> ApiError:
    """The 400 for a pydantic validation failure: the first error, with the field it names as
    ``param`` (``messages.0.content``).

    A field of several shapes (``prompt``: a string, token ids, or a list of either) fails once per
    shape, each error's location naming the shape (``prompt.str``, ``prompt.list[int].0``): the
    param is the field itself, and of its errors the deepest one is reported (the list's, for a
    list), which says what inside it is wrong.
    """
    where = _field_path(errors[0])
    first = errors[0]
    for error in errors[1:]:
        path = _field_path(error)
        if where is not None and path is not None and path.startswith(where + ".") and \
                path.count(".") > _field_path(first).count("."):
            first = error
    where = _field_path(first)
    message = str(first.get("msg"))
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    if first.get("type") == "extra_forbidden":
        message = f"unrecognized request argument supplied: {where}"
    elif first.get("type") == "missing":
        message = f"the field {where} is required"
    else:
        message = f"{where or 'the body'}: {message}"
    return ApiError(400, message, where, first.get("type"))


# Location parts that name a shape of a field, not a field: pydantic's tags of a union's members.
_SHAPES = frozenset({"str", "int", "float", "bool", "dict", "list"})


def _field_path(error: dict) -> str | None:
    """The dotted path of the request field an error is about, without the shapes' tags."""
    parts = []
    for part in error.get("loc", ()):
        if part == "body":
            continue
        if isinstance(part, int) or (part.isidentifier() and part.islower() and part not in _SHAPES):
            parts.append(str(part))
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    """Answers every error of ``app`` in OpenAI's shape."""

    @app.exception_handler(ApiError)
    async def api_error(_, error: ApiError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def request_validation_error(_, error: RequestValidationError):
        return validation_error(list(error.errors())).response()

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):
        if error.status_code == 404:
            message, code = f"no such endpoint: {request.method} {request.url.path}", "not_found"
        elif error.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
            code = "method_not_allowed"
        else:
            message, code = str(error.detail), None
        return ApiError(error.status_code, message, None, code, getattr(error, "headers", None)).response()

    @app.exception_handler(Exception)
    async def internal_error(request, error: Exception):
        log.error("%s %s failed", request.method, request.url.path, exc_info=error)
        return ApiError(500, f"internal error: {type(error).__name__}: {error}", None, "internal_error").response()
