"""A request's JSON body, read by the server itself so that every way it can be wrong is a clean 400.

FastAPI's own body parsing answers a malformed body in its own shape, reads a body of any
size, and lets through what JSON allows and text does not: ``"a\\ud800b"`` is valid JSON whose
string holds a lone UTF-16 surrogate, which no UTF-8 encoder (no tokenizer) accepts, so it
fails deep inside a handler. :func:`read_json_object` refuses a body over the size limit (413),
one that is not UTF-8, not JSON (``NaN`` included) or not an object, and any string (key or
value) holding a surrogate, naming the field (400).
"""

from __future__ import annotations

import json

from starlette.requests import Request

from jax_vattention.app.server.errors import ApiError


async def read_json_object(request: Request, max_bytes: int) -> dict:
    """The body of ``request`` as a JSON object; :class:`ApiError` for anything else."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(int(declared), max_bytes)
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > max_bytes:
            raise _too_large(len(raw), max_bytes)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ApiError(400, f"the request body is not UTF-8 text (byte {error.start}: {error.reason})",
                       None, "invalid_encoding") from None
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except ValueError as error:
        detail = (f"{error.msg} at line {error.lineno} column {error.colno}"
                  if isinstance(error, json.JSONDecodeError) else str(error))
        raise ApiError(400, f"the request body is not valid JSON: {detail}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(data).__name__}", None,
                       "invalid_json")
    where = surrogate_path(data)
    if where is not None:
        raise ApiError(400, f"{where or 'a key'} holds a lone UTF-16 surrogate (an escape such as \\ud800 "
                            f"that is half of a character): not text", where or None, "invalid_text")
    return data


def surrogate_path(value, path: str = "") -> str | None:
    """The dotted path of the first string (or key) in ``value`` with a lone surrogate, else None."""
    if isinstance(value, str):
        return path if _has_surrogate(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            inner = f"{path}.{key}" if path else str(key)
            if _has_surrogate(key):
                return path
            found = surrogate_path(item, inner)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = surrogate_path(item, f"{path}.{index}")
            if found is not None:
                return found
    return None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"the request body has {size} bytes or more; this server takes at most {limit} "
                         f"(--max-body-bytes)", None, "request_too_large")
