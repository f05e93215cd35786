"""Errors as a client sees them: OpenAI's error JSON (`{"error": {"message", "type", "param",
"code"}}` plus the request id), a short message naming the bad value, never a traceback (those
go to the server log under the same request id).

Owns `APIError` and the reading of what failed before a request reached a route: pydantic's
validation errors and FastAPI's body parsing. No FastAPI or Ray here, so it is tested bare.
"""

from __future__ import annotations

import difflib
import json
import re


class APIError(Exception):
    """An error with an HTTP status, rendered in OpenAI's error JSON by the ingress."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers or {}

    def body(self, request_id: str | None = None) -> dict:
        error = {"message": self.message, "type": self.kind, "param": self.param,
                 "code": self.status}
        if request_id is not None:
            error["request_id"] = request_id
        return {"error": error}


def show(value, limit: int = 60) -> str:
    """A bad value as the client wrote it (JSON), cut short."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):  # bytes, NaN-free dumps, deep nesting
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def in_request_terms(err: APIError, names: dict[str, str]) -> APIError:
    """The engine names its inputs `prompt` and `max_tokens`; a chat request sent `messages`
    (and maybe `max_completion_tokens`): say it in the request's words."""
    if err.param not in ("prompt", "max_tokens"):  # not an error about the engine's inputs
        return err
    message = re.sub(r"\b(prompt|max_tokens)\b", lambda m: names.get(m[1], m[1]), err.message)
    return APIError(err.status, message, names.get(err.param, err.param), err.kind, err.headers)


def _is_union_tag(part) -> bool:
    """pydantic puts the union member in an error's location ('str', 'list[int]',
    'function-after[...]', a model's class name); our field names are lower snake case."""
    return isinstance(part, str) and (
        part in ("str", "int", "float", "bool", "none") or "[" in part or "-" in part
        or part[:1].isupper())


def _param(loc) -> str:
    """('messages', 0, 'content') -> 'messages[0].content'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_error(errors: list[dict], content_type: str | None, fields: set[str]) -> APIError:
    """pydantic's errors for a request body as one 400 (415 for a body that is not JSON).
    `fields`: the request's top-level field names, to suggest one for an unknown argument."""
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON: {detail} at character "
                             f"{first['loc'][-1]}")
    located = [(tuple(p for p in e.get("loc", ()) if not _is_union_tag(p)), e) for e in errors]
    located = [(loc[1:] if loc[:1] == ("body",) else loc, e) for loc, e in located]
    if not located[0][0]:  # the body as a whole
        return _body_error(first, content_type)
    # Of a union's per-member errors, the member the input got furthest into speaks, and a
    # validator's own message (a ValueError) over "Input should be ...".
    depth = max(len(loc) for loc, _ in located)
    deepest = [(loc, e) for loc, e in located if len(loc) == depth]
    own = [(loc, e) for loc, e in deepest if e.get("type") == "value_error"]
    loc, err = (own or deepest)[0]
    param = _param(loc)
    kind = err.get("type")
    if kind == "extra_forbidden":
        hint = difflib.get_close_matches(str(loc[-1]), sorted(fields), n=1) if len(loc) == 1 \
            else []
        more = f"; did you mean {hint[0]}?" if hint else ""
        return APIError(400, f"unrecognized request argument {param}: this server does not "
                             f"implement it{more}", param)
    if kind == "missing":
        return APIError(400, f"{param} is required", param)
    if kind == "value_error":  # a validator of ours: its message may name the field itself
        msg = err["msg"].removeprefix("Value error, ")
        return APIError(400, msg if msg.startswith(param) else f"{param}: {msg}", param)
    same = [e["msg"] for lc, e in deepest if lc == loc]
    msgs = [same[0]] + [m.removeprefix("Input should be ") for m in same[1:] if m != same[0]]
    return APIError(400, f"{param}: {' or '.join(msgs)}, got {show(err.get('input'))}", param)


def _body_error(err: dict, content_type: str | None) -> APIError:
    if err.get("type") == "missing":
        return APIError(400, "the request body is empty: send a JSON object with "
                             "Content-Type: application/json")
    if isinstance(err.get("input"), bytes):  # FastAPI hands over the raw bytes of non-JSON
        got = f"got {content_type!r}" if content_type else "none was sent"
        return APIError(415, f"Content-Type must be application/json ({got}): send the "
                             "request as a JSON object", kind="unsupported_media_type")
    return APIError(400, f"the request body must be a JSON object, got {show(err.get('input'))}")


def body_parse_error(cause: BaseException | None) -> APIError:
    """What FastAPI reports only as "There was an error parsing the body", by its cause."""
    if isinstance(cause, UnicodeDecodeError):
        return APIError(400, f"the request body is not valid UTF-8: byte "
                             f"0x{cause.object[cause.start]:02x} at position {cause.start}")
    if isinstance(cause, RecursionError):
        return APIError(400, "the request body is JSON nested too deeply to parse")
    return APIError(400, "the request body could not be read as JSON")
