"""HTTP errors as RFC 9457 problem details, and the request-body and query readers.

Every error the API returns is ``application/problem+json``::

    {"type": "https://novacron.io/problems/unknown-field", "title": "Unprocessable Content",
     "status": 422, "detail": "...", "errors": [{"loc": ["labels"], "msg": "..."}]}

:func:`error_middleware` turns :class:`Problem`, aiohttp's own HTTP errors (413
from ``client_max_size``, 404 and 405 from the router) and the hub's typed errors
(:func:`problem_for`) into such bodies; anything else is logged with its
traceback and answered with a bare 500 that reveals nothing. Statuses:

* 400 malformed JSON/YAML or a bad query parameter or cursor;
* 401 missing or invalid API token; 403 the role forbids the call, or an
  enrollment token is refused (``reason``: unknown, revoked, expired, spent,
  duplicate_key -- one status for all, so a caller cannot probe token ids);
* 404 unknown resource; 409 duplicate, or a rollout command its phase forbids;
* 413 body over the limit; 415 unsupported content type;
* 422 well-formed but invalid (unknown field, bad value, placement impossible).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, TypeVar

import yaml
from aiohttp import web
from pydantic import BaseModel, ValidationError

from cloud_hub._exceptions import (
    AuthError,
    HubError,
    PlacementError,
    RolloutStateError,
    TokenNotFoundError,
)
from cloud_hub.manifests import reject_duplicate_keys
from cloud_hub.store import ConflictError, CursorError, NotFoundError, TokenRefusedError
from sync._exceptions import ConfigError

__all__ = [
    "JSON_TYPE",
    "PROBLEM_BASE",
    "PROBLEM_TYPE",
    "YAML_TYPES",
    "Problem",
    "error_middleware",
    "parse_json",
    "parse_yaml",
    "problem_for",
    "problem_response",
    "query_int",
    "query_one",
    "read_body",
    "validate_model",
]

logger = logging.getLogger(__name__)

PROBLEM_TYPE: Final = "application/problem+json"
PROBLEM_BASE: Final = "https://novacron.io/problems/"
JSON_TYPE: Final = "application/json"
YAML_TYPES: Final = frozenset({"application/yaml", "application/x-yaml", "text/yaml"})

_TITLES: Final = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_MAX_ERRORS: Final = 50
_MAX_MSG: Final = 500

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Problem(HubError):  # noqa: N818 - an RFC 9457 "problem", not a failure
    """An HTTP error to answer with a problem body.

    Attributes:
        status: the HTTP status.
        title: a short summary (by default the status's reason phrase).
        detail: what went wrong in this case.
        slug: the last part of the problem ``type`` URI.
        errors: field errors (``{"loc": [...], "msg": ...}``) for 400/422.
        extra: more members of the problem body (e.g. ``reason``).
        headers: response headers (e.g. ``WWW-Authenticate``).
    """

    def __init__(
        self,
        status: int,
        detail: str = "",
        *,
        title: str | None = None,
        slug: str | None = None,
        errors: Sequence[Mapping[str, Any]] = (),
        extra: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = status
        self.title = title or _TITLES.get(status, "Error")
        self.detail = detail
        self.slug = slug or self.title.lower().replace(" ", "-")
        self.errors = list(errors)[:_MAX_ERRORS]
        self.extra = dict(extra or {})
        self.headers = dict(headers or {})
        super().__init__(f"{status} {self.title}: {detail}" if detail else f"{status} {self.title}")

    def body(self) -> dict[str, Any]:
        """The problem document."""
        doc: dict[str, Any] = {
            "type": PROBLEM_BASE + self.slug,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if self.errors:
            doc["errors"] = self.errors
        return doc | self.extra


def problem_response(problem: Problem) -> web.Response:
    """Answer with a problem body."""
    return web.json_response(
        problem.body(),
        status=problem.status,
        content_type=PROBLEM_TYPE,
        headers=problem.headers or None,
    )


def _errors_of(exc: ValidationError, prefix: tuple[str | int, ...] = ()) -> list[dict[str, Any]]:
    return [
        {"loc": [*prefix, *err["loc"]], "msg": str(err["msg"])[:_MAX_MSG]}
        for err in exc.errors(include_url=False, include_input=False, include_context=False)
    ]


def problem_for(exc: BaseException) -> Problem | None:
    """Translate one of the hub's typed errors into a problem, None for others."""
    match exc:
        case Problem():
            return exc
        case NotFoundError() | TokenNotFoundError():
            return Problem(404, str(exc))
        case ConflictError():
            return Problem(409, str(exc), slug="conflict")
        case CursorError():
            return Problem(400, str(exc) or "invalid cursor", slug="bad-cursor")
        case TokenRefusedError():
            return Problem(
                403,
                str(exc),
                title=f"Enrollment token refused: {exc.reason}",
                slug=f"enroll-{exc.reason.replace('_', '-')}",
                extra={"reason": exc.reason},
            )
        case RolloutStateError():
            return Problem(
                409,
                str(exc),
                title="Not allowed in this rollout phase",
                slug="rollout-state",
                extra={"command": exc.command, "phase": exc.phase},
            )
        case PlacementError():
            return Problem(422, str(exc), slug="placement")
        case ConfigError():
            loc = [p for p in exc.field.split(".") if p] if exc.field else []
            errors = [{"loc": loc, "msg": str(exc)[:_MAX_MSG]}] if loc else []
            return Problem(422, str(exc), slug="invalid", errors=errors)
        case AuthError():
            return Problem(422, str(exc), slug="invalid")
        case ValidationError():
            return Problem(422, "the request is invalid", slug="invalid", errors=_errors_of(exc))
    return None


def _from_http_exception(exc: web.HTTPException) -> Problem:
    headers = {}
    if isinstance(exc, web.HTTPMethodNotAllowed):
        headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
    detail = exc.text if exc.text and not exc.text.startswith(str(exc.status)) else ""
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        detail = "the request body is larger than the hub accepts"
    return Problem(exc.status, detail, title=_TITLES.get(exc.status, exc.reason), headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every error with a problem body; never leak a traceback."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return problem_response(_from_http_exception(exc))
    except Exception as exc:  # CancelledError is a BaseException and passes through
        problem = problem_for(exc)
        if problem is None:
            logger.exception("unhandled error in %s %s", request.method, request.path)
            problem = Problem(500, "the hub failed to handle the request; see its log")
        return problem_response(problem)


# -- reading requests --------------------------------------------------------------------


async def read_body(request: web.Request, allowed: Sequence[str]) -> tuple[str, bytes]:
    """Check the content type and read the body (``client_max_size`` bounds it).

    Returns:
        The media type (lowercase, no parameters) and the body.

    Raises:
        Problem: 415 for another media type, 413 for a body over the limit.
    """
    media_type = request.content_type.lower()
    if media_type not in allowed:
        raise Problem(
            415,
            f"content type {media_type!r} is not accepted here; send {' or '.join(allowed)}",
            slug="unsupported-media-type",
        )
    try:
        charset = request.charset
    except (ValueError, LookupError):
        charset = "bogus"
    if charset is not None and charset.lower() not in ("utf-8", "utf8"):
        raise Problem(415, "only UTF-8 request bodies are accepted", slug="unsupported-charset")
    return media_type, await request.read()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(raw: bytes) -> Any:
    """Decode a strict JSON body (no duplicate keys, no NaN).

    Raises:
        Problem: 400 with the position of the error.
    """
    try:
        text = raw.decode("utf-8")
        return json.loads(
            text, object_pairs_hook=reject_duplicate_keys, parse_constant=_no_constant
        )
    except json.JSONDecodeError as exc:
        raise Problem(
            400,
            f"malformed JSON: line {exc.lineno}, column {exc.colno}: {exc.msg}",
            slug="bad-json",
        ) from exc
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise Problem(400, f"malformed JSON: {exc}"[:_MAX_MSG], slug="bad-json") from exc


def parse_yaml(raw: bytes) -> Any:
    """Decode a YAML body with the strict loader shared by every config file.

    Raises:
        Problem: 400 naming the line of the error.
    """
    # The duplicate-key-rejecting SafeLoader subclass that manifests files use.
    from firmware_profiles._yamlio import _StrictSafeLoader  # noqa: PLC0415

    try:
        return yaml.load(raw.decode("utf-8"), Loader=_StrictSafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise Problem(400, f"malformed YAML: {where}{problem}"[:_MAX_MSG], slug="bad-yaml") from exc
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise Problem(400, f"malformed YAML: {exc}"[:_MAX_MSG], slug="bad-yaml") from exc


def validate_model(model: type[M], data: Any) -> M:
    """Validate decoded data against a wire model.

    Raises:
        Problem: 422 listing every field error (an unknown field included).
    """
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = _errors_of(exc)
        unknown = any(e["type"] == "extra_forbidden" for e in exc.errors())
        raise Problem(
            422,
            "the request body is invalid",
            slug="unknown-field" if unknown else "invalid",
            errors=errors,
        ) from exc


def query_one(request: web.Request, name: str, *, max_len: int = 256) -> str | None:
    """One query parameter given at most once.

    Raises:
        Problem: 400 when repeated or too long.
    """
    values = request.query.getall(name, [])
    if not values:
        return None
    if len(values) > 1:
        raise Problem(400, f"query parameter {name!r} given more than once", slug="bad-query")
    value = values[0]
    if len(value) > max_len or not value.isprintable():
        raise Problem(400, f"query parameter {name!r} is invalid", slug="bad-query")
    return value


def query_int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    """An integer query parameter in ``[lo, hi]``.

    Raises:
        Problem: 400 for a non-integer or out-of-range value.
    """
    text = query_one(request, name, max_len=20)
    if text is None:
        return default
    digits = text.strip()
    if not (digits.lstrip("-").isascii() and digits.lstrip("-").isdigit()):
        raise Problem(400, f"query parameter {name!r} must be an integer", slug="bad-query")
    value = int(digits)
    if not lo <= value <= hi:
        raise Problem(
            400, f"query parameter {name!r} must be between {lo} and {hi}", slug="bad-query"
        )
    return value
