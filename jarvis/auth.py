"""Who is asking and what they may do: API keys, their scopes, the owner of every stored object, the audit log.

Keys come from JARVIS_API_KEYS, JARVIS_ADMIN_KEYS and JARVIS_API_KEYS_FILE (one key per line, optionally
followed by its scopes: `sk-ops admin`). Without any key the server is single-user: every request acts as
the admin and stored objects have no owner, as on a laptop.

- A request's `Principal` carries `owner`: a keyed hash of its key (HMAC-SHA256 under a secret the server
  keeps in its state dir, `owner.secret`). Stores keep that, never the key; a leaked database does not let
  anyone test guesses of a key without the secret too.
- Every stored object records its owner. Another key gets a 404, as if it did not exist (OpenAI scopes
  objects to the project that made them); the admin sees every object. An object owned by no one (made
  before keys were set, or by a single-user server) is visible to the admin only.
- Every route has an access level: `open` (no key), `key` (any valid key), `admin` (a key with the admin
  scope: adapter load/unload, engine control). A route declares it with `opt={"access": ...}`, or names the
  setting that decides it with `opt={"access_setting": ...}`; otherwise /v1 and the tokenizer routes need a
  key and the rest is open (/health too, unless JARVIS_PROTECT_HEALTH).
- `audit(...)` writes one line to the `jarvis.audit` logger for every admin action and every refused access
  (403, or a 404 that hid another key's object), naming the key by its owner hash's prefix, never the key.
  Each record carries the event as `record.audit`: the telemetry plugin counts them and adds them to traces.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from jarvis.errors import APIError, AuthenticationFailed

if TYPE_CHECKING:
    from litestar.connection import ASGIConnection
    from litestar.handlers.base import BaseRouteHandler

    from jarvis.settings import JarvisSettings

Access = Literal["open", "key", "admin"]
ACCESS_LEVELS: tuple[Access, ...] = ("open", "key", "admin")
SCOPES = ("admin",)
KEYED_PATHS = ("/v1", "/tokenize", "/detokenize", "/tokenizer_info")

audit_log = logging.getLogger("jarvis.audit")
audit_log.setLevel(logging.INFO)  # audit records exist whatever the server's log level; handlers choose


class PermissionDenied(APIError):
    status_code = 403
    error_type = "permission_error"


@dataclass(frozen=True)
class Principal:
    """Who a request acts as. `owner`: the keyed hash stored on what it creates (None: no keys, or no key
    sent to an open route). `admin`: may use admin routes and see every owner's objects."""

    owner: str | None
    admin: bool = False

    @property
    def label(self) -> str:
        """How logs name this principal: a prefix of the owner hash (never the key)."""
        if self.owner is not None:
            return "key-" + self.owner[:12]
        return "single-user" if self.admin else "anonymous"

    def may_see(self, owner: str | None) -> bool:
        return self.admin or (owner is not None and owner == self.owner)

    def owner_filter(self) -> tuple[str, tuple[Any, ...]]:
        """A SQL condition on an `owner` column selecting the rows this principal may see."""
        if self.admin:
            return "1 = 1", ()
        if self.owner is None:
            return "1 = 0", ()
        return "owner = ?", (self.owner,)


#: A server without keys: one user, who is the admin; objects have no owner.
SINGLE_USER = Principal(owner=None, admin=True)
#: No valid key on a server with keys (only open routes get this far): sees no stored object.
ANONYMOUS = Principal(owner=None, admin=False)


def owner_principal(owner: str | None) -> Principal:
    """The principal that work done on behalf of an object's owner acts as (a batch's lines): its owner, or
    the admin for an object owned by no one."""
    return SINGLE_USER if owner is None else Principal(owner=owner)


def owner_secret(state_path: Path) -> bytes:
    """The server's secret for owner hashes, made once (0600) in the state dir and kept across restarts."""
    path = state_path / "owner.secret"
    state_path.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return bytes.fromhex(path.read_text().strip())
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
        f.flush()
        os.fsync(f.fileno())
    return bytes.fromhex(path.read_text().strip())


def key_scopes(settings: JarvisSettings) -> dict[str, frozenset[str]]:
    """Every configured key and its scopes: JARVIS_API_KEYS (none), JARVIS_ADMIN_KEYS (admin) and the keys
    file's lines (`<key> [scope ...]`). A key listed twice has the union of its scopes."""
    keys: dict[str, frozenset[str]] = {}

    def add(key: str, scopes: frozenset[str]) -> None:
        keys[key] = keys.get(key, frozenset()) | scopes

    for key in settings.api_keys:
        add(key, frozenset())
    for key in settings.admin_keys:
        add(key, frozenset({"admin"}))
    for key, scopes in settings.keys_file_entries():
        add(key, frozenset(scopes))
    return keys


def control_key(settings: JarvisSettings) -> str | None:
    """The key a command sends to its own server's admin routes (publishing an adapter): the first key with
    the admin scope, else the first key, else none."""
    keys = key_scopes(settings)
    admins = [key for key, scopes in keys.items() if "admin" in scopes]
    return next(iter(admins or keys), None)


@dataclass
class KeyRing:
    """The configured keys, each with its owner hash and scopes; identifies a bearer token in constant time."""

    keys: Mapping[str, frozenset[str]]
    secret: bytes
    _entries: list[tuple[bytes, Principal]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._entries = [(key.encode(), Principal(owner=self.owner_of(key), admin="admin" in scopes))
                         for key, scopes in self.keys.items()]

    @classmethod
    def from_settings(cls, settings: JarvisSettings) -> KeyRing:
        keys = key_scopes(settings)
        return cls(keys, owner_secret(settings.state_path) if keys else b"")

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    @property
    def anonymous(self) -> Principal:
        """Who a request without a valid key acts as."""
        return ANONYMOUS if self.enabled else SINGLE_USER

    def owner_of(self, key: str) -> str:
        return hmac.new(self.secret, key.encode(), hashlib.sha256).hexdigest()

    def identify(self, token: str | None) -> Principal | None:
        """The principal of a bearer token, or None. Every key is compared, so timing does not tell which
        matched, or whether any did."""
        supplied = (token or "").encode()
        found: Principal | None = None
        for key, principal in self._entries:
            if hmac.compare_digest(supplied, key) and found is None:
                found = principal
        return found


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The key a request sends: `Authorization: Bearer <key>` (OpenAI's SDK), else `X-API-Key: <key>`
    (Anthropic's and Tinker's SDKs)."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key", "").strip() or None


def audit(action: str, outcome: str, actor: Principal, **details: Any) -> None:
    """One audit line (and a `record.audit` event for the telemetry plugin); no key in it, ever.
    `outcome`: allowed (an admin action), denied (403) or hidden (a 404 for another owner's object)."""
    event = {"action": action, "outcome": outcome, "actor": actor.label,
             **{k: v for k, v in details.items() if v is not None}}
    text = " ".join(f"{k}={v}" for k, v in event.items())
    audit_log.log(logging.INFO if outcome == "allowed" else logging.WARNING, "audit %s", text,
                  extra={"audit": event})


def visible(viewer: Principal, owner: str | None, action: str, target: str) -> bool:
    """Whether `viewer` may see an object of `owner`; a refusal is audited (`hidden`: the caller answers 404),
    and so is the admin reaching into another owner's object."""
    if viewer.may_see(owner):
        if viewer.owner is not None and owner != viewer.owner:
            audit(action, "allowed", viewer, target=target, owner=owner_label(owner))
        return True
    audit(action, "hidden", viewer, target=target, owner=owner_label(owner))
    return False


def owner_label(owner: str | None) -> str:
    return "key-" + owner[:12] if owner else "none"


def access_level(settings: JarvisSettings, path: str, opt: Mapping[str, Any]) -> Access:
    """The access a route needs: declared by the route, or by the setting it names, else by its path."""
    if "access" in opt:
        return opt["access"]
    if "access_setting" in opt:
        return getattr(settings, opt["access_setting"])
    if path.startswith(KEYED_PATHS) or (settings.protect_health and path.startswith("/health")):
        return "key"
    return "open"


def access_guard(settings: JarvisSettings, keyring: KeyRing):
    """The app's guard: identifies the caller (kept as the connection's `user`), then enforces the route's
    access level: 401 without a valid key where one is needed, 403 naming the scope on an admin route."""

    async def guard(connection: ASGIConnection, handler: BaseRouteHandler) -> None:  # async: run inline, not in
        # a worker thread (Litestar hands a sync guard to its thread pool on every request)
        principal = keyring.identify(bearer_token(connection.headers)) if keyring.enabled else SINGLE_USER
        connection.scope["user"] = principal or keyring.anonymous
        if not keyring.enabled:
            return
        level = access_level(settings, connection.url.path, handler.opt)
        if level == "open":
            return
        action = f"{connection.scope.get('method', 'GET')} {connection.url.path}"
        if principal is None:
            raise AuthenticationFailed("Incorrect API key provided. Send `Authorization: Bearer <key>` (or "
                                       "`X-API-Key: <key>`) with one of the keys in JARVIS_API_KEYS.",
                                       code="invalid_api_key")
        if level == "admin":
            if not principal.admin:
                audit(action, "denied", principal, scope="admin")
                raise PermissionDenied(f"{action} needs the `admin` scope, which this API key does not have. Use "
                                       "a key listed in JARVIS_ADMIN_KEYS (or one with the admin scope in "
                                       "JARVIS_API_KEYS_FILE).", code="insufficient_scope")
            audit(action, "allowed", principal, scope="admin")

    return guard


def principal_of(connection: ASGIConnection) -> Principal:
    """Who a request acts as (set by the access guard, which every route has)."""
    return connection.scope.get("user") or ANONYMOUS
