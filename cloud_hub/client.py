"""A small typed client for the hub's REST API (``/api/v1``), used by the operator CLI.

::

    async with HubClient("http://127.0.0.1:8090", token) as hub:
        page = await hub.list_devices(labels={"site": "plant-1"})
        async for device in hub.iter_pages(lambda cursor: hub.list_devices(cursor=cursor)):
            ...

It speaks JSON over aiohttp (the hub's own HTTP stack, and what ``novacron agent
enroll`` uses), so the same client serves the CLI (one ``asyncio.run`` per
command), tests and scripts that already run an event loop. Bodies come back as
the JSON the API documents (``dict``), lists as :class:`Page`.

Errors, all :class:`~cloud_hub._exceptions.HubError`::

    HubClientError                 base of the client's errors (url)
    ├── HubApiError                the hub answered with a problem (status, title, detail, errors)
    ├── HubUnreachableError        connection refused, DNS, TLS, timeout
    └── HubResponseError           a success answer that is not the JSON documented
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import quote, urlsplit

from cloud_hub._closing import AsyncClosing
from cloud_hub._exceptions import HubError

if TYPE_CHECKING:
    import aiohttp

__all__ = [
    "API_PREFIX",
    "DEFAULT_HUB_URL",
    "ApplyResult",
    "HubApiError",
    "HubClient",
    "HubClientError",
    "HubResponseError",
    "HubUnreachableError",
    "Page",
    "RolloutCommand",
]

logger = logging.getLogger(__name__)

DEFAULT_HUB_URL: Final = "http://127.0.0.1:8090"
API_PREFIX: Final = "/api/v1"
MAX_RESPONSE_BYTES: Final = 64 * 1024 * 1024
_CONNECT_TIMEOUT_S: Final = 10.0
_MAX_PAGES: Final = 100_000

RolloutCommand = Literal["pause", "resume", "undo"]


class HubClientError(HubError):
    """Base of the errors of :class:`HubClient`.

    Attributes:
        url: the URL of the request that failed.
    """

    def __init__(self, message: str, *, url: str = "") -> None:
        self.url = url
        super().__init__(message)


class HubApiError(HubClientError):
    """The hub refused or failed a request (an HTTP error status, a problem body).

    Attributes:
        status: the HTTP status.
        title: the problem's title (the reason phrase without a problem body).
        detail: the problem's detail (``""`` when none).
        type: the problem's type URI (``"about:blank"`` when none).
        errors: field errors as ``(location, message)``, location dotted
            (``spec.rollout.waves.1``).
        body: the whole problem document (empty when the body was not JSON).
    """

    def __init__(
        self,
        status: int,
        title: str,
        detail: str = "",
        *,
        problem_type: str = "about:blank",
        errors: Sequence[tuple[str, str]] = (),
        body: Mapping[str, Any] | None = None,
        url: str = "",
    ) -> None:
        self.status = status
        self.title = title
        self.detail = detail
        self.type = problem_type
        self.errors = tuple(errors)
        self.body: Mapping[str, Any] = dict(body or {})
        message = f"{status} {title}"
        if detail:
            message += f": {detail}"
        for loc, msg in self.errors:
            message += f"\n  {loc}: {msg}" if loc else f"\n  {msg}"
        super().__init__(message, url=url)


class HubUnreachableError(HubClientError):
    """The hub could not be reached: connection refused, DNS, TLS or a timeout.

    Attributes:
        reason: what happened, in words.
    """

    def __init__(self, url: str, reason: str) -> None:
        self.reason = reason
        super().__init__(f"cannot reach the hub at {url}: {reason}", url=url)


class HubResponseError(HubClientError):
    """A success status with a body that is not the JSON the API documents."""


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing.

    Attributes:
        items: the records, as JSON objects.
        next_cursor: pass it back for the next page; None on the last page.
    """

    items: tuple[dict[str, Any], ...]
    next_cursor: str | None = None


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What ``POST /deployments`` answered.

    Attributes:
        created: True for a new version (201), False when unchanged (200).
        deployment: the deployment record (``name``, ``version``, ``document``...).
        rollout: its rollout, if any.
        body: the whole answer.
    """

    created: bool
    deployment: dict[str, Any]
    rollout: dict[str, Any] | None
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The deployment's name."""
        return str(self.deployment.get("name", ""))

    @property
    def version(self) -> int | None:
        """The deployment's current version (None if the hub did not say)."""
        version = self.deployment.get("version")
        return version if isinstance(version, int) else None


def _segment(value: str) -> str:
    """One path segment, percent-encoded (a ``/`` in an id cannot change the route)."""
    return quote(value, safe="")


def _problem_errors(raw: Any) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if not isinstance(raw, list):
        return out
    for item in raw:
        if not isinstance(item, Mapping):
            continue
        loc = item.get("loc", [])
        where = ".".join(str(p) for p in loc) if isinstance(loc, list) else str(loc)
        out.append((where, str(item.get("msg", ""))))
    return out


def _api_error(status: int, reason: str, raw: bytes, url: str) -> HubApiError:
    """Turn an error answer into :class:`HubApiError` (a problem body if there is one)."""
    try:
        doc = json.loads(raw.decode("utf-8")) if raw else None
    except (UnicodeDecodeError, ValueError):
        doc = None
    if isinstance(doc, Mapping):
        title = doc.get("title")
        detail = doc.get("detail")
        kind = doc.get("type")
        return HubApiError(
            status,
            str(title) if title else reason,
            str(detail) if detail else "",
            problem_type=str(kind) if kind else "about:blank",
            errors=_problem_errors(doc.get("errors")),
            body=doc,
            url=url,
        )
    text = raw.decode("utf-8", "replace").strip()[:500] if raw else ""
    return HubApiError(status, reason or "Error", text, url=url)


def _page(body: Any, url: str) -> Page:
    if isinstance(body, list):  # a listing that is not paginated
        items = body
        cursor = None
    elif isinstance(body, Mapping) and isinstance(body.get("items"), list):
        items = body["items"]
        cursor = body.get("next_cursor")
    else:
        raise HubResponseError("a listing without 'items'", url=url)
    if not all(isinstance(i, dict) for i in items) or not (
        cursor is None or isinstance(cursor, str)
    ):
        raise HubResponseError("a listing of something other than objects", url=url)
    return Page(tuple(items), cursor or None)


def _object(body: Any, url: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise HubResponseError(f"expected a JSON object, got {type(body).__name__}", url=url)
    return body


def _describe(exc: BaseException, timeout_s: float) -> str:
    import aiohttp  # noqa: PLC0415

    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout_s:g} s"
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return "connection refused"
        return str(exc.os_error.strerror or exc.os_error or "cannot connect")
    return str(exc) or type(exc).__name__


class HubClient(AsyncClosing):
    """An async client for one hub, with one bearer token.

    Use it as an async context manager (it owns an ``aiohttp.ClientSession``).
    """

    def __init__(self, base_url: str, token: str | None = None, *, timeout_s: float = 30.0) -> None:
        """Set up; nothing connects until the first request.

        Args:
            base_url: the hub, ``http(s)://host[:port]`` (a path prefix is kept).
            token: an API token, sent as ``Authorization: Bearer``; None for the
                routes open without one.
            timeout_s: deadline of each request; connecting gets at most 10 s.

        Raises:
            ValueError: the URL is not http(s) or has no host.
        """
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"hub URL must be http:// or https:// with a host, not {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def aclose(self) -> None:
        """Close the HTTP session (idempotent)."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _get_session(self) -> aiohttp.ClientSession:
        import aiohttp  # noqa: PLC0415 - keep `novacron --help` light

        if self._session is None:
            timeout = aiohttp.ClientTimeout(
                total=self._timeout_s, connect=min(self._timeout_s, _CONNECT_TIMEOUT_S)
            )
            headers = {"Accept": "application/json, application/problem+json"}
            if self._token:
                headers["Authorization"] = f"Bearer {self._token}"
            self._session = aiohttp.ClientSession(timeout=timeout, headers=headers)
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Sequence[tuple[str, str]] = (),
        json_body: Any = None,
    ) -> tuple[int, Any]:
        """Send one request under ``/api/v1`` and decode the JSON answer.

        Args:
            method: the HTTP method.
            path: the path after ``/api/v1`` (segments already encoded).
            params: query parameters, repeatable.
            json_body: a JSON body, if any.

        Returns:
            The status and the decoded body (None for an empty body).

        Raises:
            HubApiError: a status of 400 or more.
            HubUnreachableError: connection, DNS, TLS failure or timeout.
            HubResponseError: a success answer that is not JSON, or too large.
        """
        import aiohttp  # noqa: PLC0415
        from yarl import URL  # noqa: PLC0415 - aiohttp's own URL type

        url = f"{self.base_url}{API_PREFIX}{path}"
        session = self._get_session()
        kwargs: dict[str, Any] = {"params": list(params) or None}
        if json_body is not None:
            kwargs["json"] = json_body
        logger.debug("%s %s", method, url)
        try:
            async with session.request(method, URL(url, encoded=True), **kwargs) as resp:
                raw = await _read_capped(resp, url)
                status, reason = resp.status, resp.reason or ""
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise HubUnreachableError(self.base_url, _describe(exc, self._timeout_s)) from exc
        if status >= 400:
            raise _api_error(status, reason, raw, url)
        if not raw:
            return status, None
        try:
            return status, json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise HubResponseError(f"the answer ({status}) is not JSON", url=url) from exc

    async def _get_object(self, path: str) -> dict[str, Any]:
        _, body = await self.request("GET", path)
        return _object(body, path)

    async def _get_page(self, path: str, params: list[tuple[str, str]]) -> Page:
        _, body = await self.request("GET", path, params=params)
        return _page(body, path)

    @staticmethod
    def _paging(params: list[tuple[str, str]], cursor: str | None, limit: int | None) -> None:
        if cursor is not None:
            params.append(("cursor", cursor))
        if limit is not None:
            params.append(("limit", str(limit)))

    async def iter_pages(
        self, fetch: Callable[[str | None], Awaitable[Page]]
    ) -> AsyncIterator[dict[str, Any]]:
        """Every item of a listing, following ``next_cursor`` from the first page.

        Args:
            fetch: gets the page at a cursor (None for the first), e.g.
                ``lambda c: hub.list_devices(region="eu", cursor=c)``.

        Raises:
            HubResponseError: the hub handed out the same cursor twice (a loop).
        """
        cursor: str | None = None
        seen: set[str] = set()
        for _ in range(_MAX_PAGES):
            page = await fetch(cursor)
            for item in page.items:
                yield item
            if page.next_cursor is None:
                return
            if page.next_cursor in seen:
                raise HubResponseError(f"the hub repeated cursor {page.next_cursor!r}")
            seen.add(page.next_cursor)
            cursor = page.next_cursor
        raise HubResponseError(f"more than {_MAX_PAGES} pages")

    # -- devices ----------------------------------------------------------------------------

    async def list_devices(
        self,
        *,
        labels: Mapping[str, str] | None = None,
        region: str | None = None,
        profile: str | None = None,
        status: str | None = None,
        cursor: str | None = None,
        limit: int | None = None,
    ) -> Page:
        """``GET /devices``: devices matching every filter given."""
        params = [("label", f"{k}={v}") for k, v in (labels or {}).items()]
        for name, value in (("region", region), ("profile", profile), ("status", status)):
            if value is not None:
                params.append((name, value))
        self._paging(params, cursor, limit)
        return await self._get_page("/devices", params)

    async def get_device(self, device_id: str) -> dict[str, Any]:
        """``GET /devices/{id}``: record, health, state and assignments."""
        return await self._get_object(f"/devices/{_segment(device_id)}")

    # -- deployments ------------------------------------------------------------------------

    async def apply(self, document: Mapping[str, Any]) -> ApplyResult:
        """``POST /deployments`` with a manifest document (JSON).

        Args:
            document: the manifest, e.g.
                :meth:`cloud_hub.manifests.Deployment.to_document`.
        """
        status, body = await self.request("POST", "/deployments", json_body=dict(document))
        body = _object(body, "/deployments")
        deployment = body.get("deployment", body)
        rollout = body.get("rollout")
        return ApplyResult(
            created=status == 201,
            deployment=deployment if isinstance(deployment, dict) else {},
            rollout=rollout if isinstance(rollout, dict) else None,
            body=body,
        )

    async def list_deployments(
        self, *, cursor: str | None = None, limit: int | None = None
    ) -> Page:
        """``GET /deployments``."""
        params: list[tuple[str, str]] = []
        self._paging(params, cursor, limit)
        return await self._get_page("/deployments", params)

    async def get_deployment(self, name: str) -> dict[str, Any]:
        """``GET /deployments/{name}``: latest record, rollout and assignments."""
        return await self._get_object(f"/deployments/{_segment(name)}")

    # -- rollouts ---------------------------------------------------------------------------

    async def list_rollouts(
        self, *, phase: str | None = None, cursor: str | None = None, limit: int | None = None
    ) -> Page:
        """``GET /rollouts``, optionally only those in ``phase``."""
        params = [("phase", phase)] if phase is not None else []
        self._paging(params, cursor, limit)
        return await self._get_page("/rollouts", params)

    async def get_rollout(self, name: str) -> dict[str, Any]:
        """``GET /rollouts/{name}``: the deployment's current rollout."""
        return await self._get_object(f"/rollouts/{_segment(name)}")

    async def rollout_command(self, name: str, command: RolloutCommand) -> dict[str, Any]:
        """``POST /rollouts/{name}/{command}``; the rollout after the command.

        Raises:
            HubApiError: 409 when the rollout's phase does not allow the command.
        """
        if command not in ("pause", "resume", "undo"):
            raise ValueError(f"unknown rollout command {command!r}")
        _, body = await self.request("POST", f"/rollouts/{_segment(name)}/{command}")
        return _object(body, f"/rollouts/{name}/{command}")

    # -- enrollment tokens ------------------------------------------------------------------

    async def create_enroll_token(
        self,
        *,
        name: str,
        region: str,
        labels: Mapping[str, str] | None = None,
        max_uses: int = 1,
        ttl_s: int | None = None,
    ) -> dict[str, Any]:
        """``POST /enrollment-tokens``; the answer holds the secret ``token``, shown once."""
        body: dict[str, Any] = {"name": name, "region": region, "max_uses": max_uses}
        if labels:
            body["labels"] = dict(labels)
        if ttl_s is not None:
            body["ttl_s"] = ttl_s
        _, answer = await self.request("POST", "/enrollment-tokens", json_body=body)
        return _object(answer, "/enrollment-tokens")

    async def list_enroll_tokens(
        self, *, cursor: str | None = None, limit: int | None = None
    ) -> Page:
        """``GET /enrollment-tokens`` (never their secrets)."""
        params: list[tuple[str, str]] = []
        self._paging(params, cursor, limit)
        return await self._get_page("/enrollment-tokens", params)

    async def revoke_enroll_token(self, token_id: str) -> None:
        """``DELETE /enrollment-tokens/{id}``."""
        await self.request("DELETE", f"/enrollment-tokens/{_segment(token_id)}")


async def _read_capped(resp: aiohttp.ClientResponse, url: str) -> bytes:
    if resp.content_length is not None and resp.content_length > MAX_RESPONSE_BYTES:
        raise HubResponseError(f"answer larger than {MAX_RESPONSE_BYTES} bytes", url=url)
    raw = await resp.content.read(MAX_RESPONSE_BYTES + 1)
    # read(n) may return less than n before the end: keep reading to the cap.
    chunks = [raw]
    size = len(raw)
    while raw and size <= MAX_RESPONSE_BYTES:
        raw = await resp.content.read(MAX_RESPONSE_BYTES + 1 - size)
        chunks.append(raw)
        size += len(raw)
    if size > MAX_RESPONSE_BYTES:
        raise HubResponseError(f"answer larger than {MAX_RESPONSE_BYTES} bytes", url=url)
    return b"".join(chunks)
