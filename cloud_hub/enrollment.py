"""Enrollment: tokens operators hand out, and devices redeeming them.

Tokens
    ``nce_<id>_<secret>``: ``id`` is 12 lowercase hex characters (public: it names
    the token in listings, revocations and the audit log), ``secret`` is
    ``secrets.token_urlsafe(32)``. The store keeps ``sha256(secret)`` only; the raw
    token is returned once, by :meth:`Enrollment.create_token`. A token admits
    ``max_uses`` devices into one region with the token's labels, until it expires
    or is revoked.

Redeeming (:meth:`Enrollment.redeem`, behind ``POST /api/v1/enroll``)
    1. the request's firmware profile must exist (else :class:`UnknownProfileError`);
    2. the store checks and uses the token and adds the device in one transaction
       (:meth:`cloud_hub.store.Store.redeem_enroll_token`): the device id is
       ``dev-`` and the first 16 hex digits of ``sha256(public key bytes)``, so a
       key maps to one id and a second enrollment of the key is refused
       (``duplicate_key``) without spending the token;
    3. a random MQTT password is made and the broker account provisioned
       (:class:`cloud_hub.broker_accounts.BrokerAccounts`; skipped when there is
       none). If that fails the device is removed again and
       :class:`BrokerUnavailableError` raised; the token use stays spent (the
       operator can raise ``max_uses`` or make another token);
    4. the ``on_enrolled`` hooks run (the reconciler registers the device's key,
       the fleet controller places deployments on it); a failing hook is logged,
       not raised: the device is enrolled and its credentials must reach it;
    5. a ``device.enrolled`` event is published and the enrollment audited
       (actor ``enroll:<token id>``), then the answer built with the region's relays
       and relay keys.

Every refusal is a :class:`cloud_hub.store.TokenRefusedError` with its reason
(``unknown``, ``revoked``, ``expired``, ``spent``, ``duplicate_key``); the API
answers all of them 403 with the reason in the body.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from pydantic import SecretStr, ValidationError

from cloud_hub._exceptions import HubError
from cloud_hub.audit import AuditLog
from cloud_hub.broker_accounts import BrokerAccounts, BrokerAccountsError
from cloud_hub.store import (
    DeviceRecord,
    EnrollTokenRecord,
    NotFoundError,
    Store,
    TokenRefusedError,
)
from edge_agent._enroll_wire import EnrollRequest, EnrollResponse, MqttAccount
from sync._exceptions import ConfigError

__all__ = [
    "ENROLL_TOKEN_PREFIX",
    "BrokerUnavailableError",
    "Enrollment",
    "EnrollmentError",
    "RegionInfo",
    "RegionNotServedError",
    "UnknownProfileError",
    "UnknownRegionError",
    "device_id_for",
    "mint_enroll_token",
    "parse_enroll_token",
]

logger = logging.getLogger(__name__)

ENROLL_TOKEN_PREFIX: Final = "nce"
_TOKEN_RE: Final = re.compile(r"nce_([0-9a-f]{12})_([A-Za-z0-9_-]{32,128})")
_ENROLL_ACTION: Final = "POST /api/v1/enroll"

EnrolledHook = Callable[[DeviceRecord], Awaitable[Any]]
RemovedHook = Callable[[str], Awaitable[Any]]
Publish = Callable[[str, Mapping[str, Any]], None]


class EnrollmentError(HubError):
    """Base of the enrollment service's errors."""


class UnknownProfileError(EnrollmentError):
    """The device asked for a firmware profile the hub does not know (an API 422).

    Attributes:
        profile: the name asked for.
    """

    def __init__(self, profile: str) -> None:
        self.profile = profile
        super().__init__(f"unknown firmware profile {profile!r}")


class UnknownRegionError(EnrollmentError):
    """A token for a region the hub has no relays for (an API 422).

    Attributes:
        region: the region asked for.
    """

    def __init__(self, region: str) -> None:
        self.region = region
        super().__init__(f"the hub serves no region {region!r} (no relays configured)")


class RegionNotServedError(EnrollmentError):
    """A valid token whose region the hub no longer serves (an API 503).

    Attributes:
        region: the token's region.
    """

    def __init__(self, region: str) -> None:
        self.region = region
        super().__init__(f"the hub has no relays configured for region {region!r}")


class BrokerUnavailableError(EnrollmentError):
    """The broker account could not be provisioned; the device was removed (an API 503)."""


@dataclass(frozen=True, slots=True)
class RegionInfo:
    """What a device of a region is told at enrollment.

    Attributes:
        relays: the region's relay brokers, ``mqtt(s)://host[:port]``, in failover order.
        relay_public_keys: the relays' Ed25519 public keys (base64 of 32 bytes).
    """

    relays: tuple[str, ...]
    relay_public_keys: tuple[str, ...] = ()


def device_id_for(public_key_b64: str) -> str:
    """The device id a public key enrolls as: ``dev-`` + 16 hex of sha256(key bytes)."""
    raw = base64.b64decode(public_key_b64, validate=True)
    return "dev-" + hashlib.sha256(raw).hexdigest()[:16]


def mint_enroll_token() -> tuple[str, str, str]:
    """Return a new ``(token id, raw token, secret hash)``."""
    token_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return token_id, f"{ENROLL_TOKEN_PREFIX}_{token_id}_{secret}", _hash(secret)


def parse_enroll_token(raw: str) -> tuple[str, str] | None:
    """Return ``(token id, secret hash)`` of a well-formed raw token, else None."""
    match = _TOKEN_RE.fullmatch(raw)
    if match is None:
        return None
    return match.group(1), _hash(match.group(2))


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


class Enrollment:
    """The enrollment service (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        audit: AuditLog,
        *,
        regions: Mapping[str, RegionInfo],
        hub_public_key: str,
        clock: Callable[[], int],
        broker: BrokerAccounts | None = None,
        on_enrolled: Sequence[EnrolledHook] = (),
        on_removed: Sequence[RemovedHook] = (),
        publish: Publish | None = None,
        profiles: Collection[str] | None = None,
    ) -> None:
        """Make the service.

        Args:
            store: the fleet store.
            audit: the audit log (enrollments are written to it).
            regions: relays and relay keys per region the hub serves.
            hub_public_key: the hub's Ed25519 public key, base64 of 32 bytes.
            clock: hub clock in ms.
            broker: where device MQTT accounts are provisioned; None for none.
            on_enrolled: async hooks called with each new device.
            on_removed: async hooks called with the id of each decommissioned device.
            publish: fleet event sink (:meth:`cloud_hub.events.EventBus.publish`).
            profiles: firmware profile names accepted; None for the built-in ones.

        Raises:
            ConfigError: a region whose relays or keys are invalid, or a bad hub key.
        """
        for name, info in regions.items():
            try:
                self._answer_model(name, info, "dev-0", "x", hub_public_key)
            except ValidationError as exc:
                first = exc.errors(include_url=False)[0]
                where = ".".join(str(p) for p in first["loc"])
                raise ConfigError(
                    f"region {name!r}: {where}: {first['msg']}", field=f"regions.{name}"
                ) from exc
        if profiles is None:
            from firmware_profiles import profile_names  # noqa: PLC0415

            profiles = profile_names()
        self._store = store
        self._audit = audit
        self._regions = dict(regions)
        self._hub_key = hub_public_key
        self._clock = clock
        self.broker = broker
        """Where broker accounts are provisioned (None: nowhere)."""
        self.on_enrolled: list[EnrolledHook] = list(on_enrolled)
        self.on_removed: list[RemovedHook] = list(on_removed)
        self._publish = publish
        self._profiles = frozenset(profiles)

    @property
    def regions(self) -> frozenset[str]:
        """The regions the hub serves."""
        return frozenset(self._regions)

    @staticmethod
    def _answer_model(
        region: str, info: RegionInfo, device_id: str, password: str, hub_key: str
    ) -> EnrollResponse:
        return EnrollResponse(
            device_id=device_id,
            region=region,
            relays=info.relays,
            mqtt=MqttAccount(username=device_id, password=SecretStr(password)),
            hub_public_key=hub_key,
            relay_public_keys=info.relay_public_keys,
        )

    # -- tokens -------------------------------------------------------------------------

    async def create_token(
        self,
        *,
        name: str,
        region: str,
        actor: str,
        labels: Mapping[str, str] | None = None,
        max_uses: int = 1,
        ttl_s: int | None = None,
    ) -> tuple[str, EnrollTokenRecord]:
        """Make and store a token; return ``(raw token, record)``, the raw token shown once.

        Raises:
            UnknownRegionError: the hub serves no such region.
            ValueError: ``max_uses`` or ``ttl_s`` below 1.
        """
        if region not in self._regions:
            raise UnknownRegionError(region)
        if max_uses < 1 or (ttl_s is not None and ttl_s < 1):
            raise ValueError("max_uses and ttl_s must be at least 1")
        now = self._clock()
        token_id, raw, secret_hash = mint_enroll_token()
        record = EnrollTokenRecord(
            id=token_id,
            secret_hash=secret_hash,
            name=name,
            region=region,
            labels=dict(labels or {}),
            max_uses=max_uses,
            expires_at_ms=None if ttl_s is None else now + ttl_s * 1000,
            created_at_ms=now,
            created_by=actor,
        )
        stored = await self._store.create_enroll_token(record)
        logger.info("enrollment token %s (%s) for region %s created", token_id, name, region)
        return raw, stored

    async def revoke_token(self, token_id: str) -> EnrollTokenRecord:
        """Revoke a token (idempotent). Raises :class:`cloud_hub.store.NotFoundError`."""
        record = await self._store.revoke_enroll_token(token_id, self._clock())
        logger.info("enrollment token %s revoked", token_id)
        return record

    # -- devices ------------------------------------------------------------------------

    async def redeem(self, request: EnrollRequest) -> EnrollResponse:
        """Enroll a device (see the module docstring).

        Raises:
            UnknownProfileError: the profile is unknown (nothing changes).
            TokenRefusedError: the token is refused (nothing changes).
            RegionNotServedError: the token's region has no relays configured now.
            BrokerUnavailableError: the broker account could not be made.
        """
        if request.profile not in self._profiles:
            raise UnknownProfileError(request.profile)
        parsed = parse_enroll_token(request.token.get_secret_value())
        if parsed is None:
            raise TokenRefusedError("unknown", "unknown enrollment token")
        token_id, secret_hash = parsed
        try:
            token = await self._store.get_enroll_token(token_id)
        except NotFoundError:
            raise TokenRefusedError("unknown", "unknown enrollment token") from None
        if token.region not in self._regions:  # only revealed to a caller with a real id
            raise RegionNotServedError(token.region)

        device_id = device_id_for(request.public_key)
        password = secrets.token_urlsafe(24)
        now = self._clock()
        facts = request.facts.model_dump(mode="json")

        def make_device(t: EnrollTokenRecord) -> DeviceRecord:
            return DeviceRecord(
                id=device_id,
                region=t.region,
                profile=request.profile,
                public_key=request.public_key,
                arch=request.facts.arch,
                labels=dict(t.labels),
                facts=facts,
                enrolled_at_ms=now,
                token_id=t.id,
                mqtt_username=device_id,
            )

        device = await self._store.redeem_enroll_token(token_id, secret_hash, now, make_device)
        info = self._regions.get(device.region)
        if info is None:  # the region left the configuration meanwhile
            await self._store.delete_device(device.id)
            raise RegionNotServedError(device.region)
        if self.broker is not None:
            try:
                await self.broker.provision(
                    device.mqtt_username, password, device.id, device.region
                )
            except BrokerAccountsError as exc:
                logger.exception("enrollment of %s: broker account failed", device.id)
                await self._store.delete_device(device.id)
                raise BrokerUnavailableError(
                    f"the broker account for {device.id} could not be provisioned; try again later"
                ) from exc
        for hook in self.on_enrolled:
            try:
                await hook(device)
            except Exception:  # the device is enrolled; its credentials must reach it
                logger.exception("enrollment of %s: hook %r failed", device.id, hook)
        event = {"id": device.id, "region": device.region, "profile": device.profile}
        if self._publish is not None:
            self._publish("device.enrolled", event | {"labels": dict(device.labels)})
        await asyncio.to_thread(
            self._audit.append,
            actor=f"enroll:{token_id}",
            role="enrollment",
            action=_ENROLL_ACTION,
            target=f"device/{device.id}",
            outcome=201,
            detail=event | {"token_id": token_id, "public_key": device.public_key},
        )
        logger.info(
            "device %s enrolled in %s (profile %s, token %s)",
            device.id,
            device.region,
            device.profile,
            token_id,
        )
        return self._answer_model(device.region, info, device.id, password, self._hub_key)

    async def decommission(self, device_id: str) -> DeviceRecord:
        """Remove a device, revoke its broker account and run the ``on_removed`` hooks.

        Raises:
            NotFoundError: no such device.
        """
        device = await self._store.delete_device(device_id)
        if self.broker is not None and device.mqtt_username:
            try:
                await self.broker.revoke(device.mqtt_username)
            except BrokerAccountsError:
                logger.exception("decommission of %s: broker account not revoked", device_id)
        for hook in self.on_removed:
            try:
                await hook(device_id)
            except Exception:
                logger.exception("decommission of %s: hook %r failed", device_id, hook)
        if self._publish is not None:
            self._publish("device.removed", {"id": device_id, "region": device.region})
        logger.info("device %s decommissioned", device_id)
        return device
