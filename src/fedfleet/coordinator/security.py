"""Who may call what: bearer tokens, checked by an ASGI middleware before any route runs.

Three credentials, each optional (a coordinator with none is open, as on a developer's loopback):

- the **admin token** (``--admin-token-file`` / ``FEDFLEET_ADMIN_TOKEN``) opens the control and
  read endpoints: status, rounds, workers, evaluate, metrics, the dashboard and the predict page.
  Browsers get it as an HttpOnly cookie from ``/login`` (a browser that opens a page without it is
  shown the sign-in form, and lands on that page once signed in); ``POST /logout`` clears it and
  ``GET /v1/session`` says whether a token is needed and whether this browser holds it;
- the **join token** (``--join-token-file`` / ``FEDFLEET_JOIN_TOKEN``) lets a worker register;
- a **worker token**, issued at registration when a join token is set, lets one worker id, and only
  that one, poll for tasks, download the model, send heartbeats and upload updates. It is
  ``ID~MAC`` with MAC = HMAC-SHA256(run secret, ID): the coordinator keeps no table of tokens, and
  the run secret (``auth.key`` in the data dir, mode 0600) makes them survive a restart.

A coordinator whose admin endpoints are open (no admin token) on loopback answers only requests whose
``Host`` is one of its own names (``HostCheck``): otherwise any web page could read and drive it
through DNS rebinding, a name of the attacker's that resolves to 127.0.0.1.

Every comparison is constant-time (``hmac.compare_digest``); tokens are never logged. A request with
no or a wrong token gets 401 with ``WWW-Authenticate: Bearer``; a valid token used outside its scope
(a worker token on an admin endpoint, or for another worker's id) gets 403.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import ipaddress
import json
import os
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, quote, urlsplit

from fedfleet.asgi import ASGIApp, respond
from fedfleet.coordinator.http_limits import Tally
from fedfleet.errors import AuthError, ConfigError
from fedfleet.protocol.messages import API

Scope = Literal["public", "join", "worker", "admin", "model"]
SECRET_FILE = "auth.key"
COOKIE = "fedfleet_admin"
WORKER_TOKEN_HEADER = "x-fedfleet-worker-token"
SEPARATOR = "~"  # not allowed in a worker id (messages.WorkerId), so ID~MAC splits one way only
MIN_TOKEN_CHARS = 16
# Where the worker's own id sits in the path: /v1/workers/{id}/task.
_WORKER_PATH = f"{API}/workers/"


def read_token(file: Path | None, env: str, what: str) -> str | None:
    """A token from ``file`` (first line) or the environment variable ``env``; None if neither is set."""
    if file is not None:
        try:
            token = file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the {what} file {file}: {exc.strerror}", option=what) from exc
    else:
        token = os.environ.get(env, "").strip()
        if not token:
            return None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ConfigError(f"the {what} must be at least {MIN_TOKEN_CHARS} characters with no spaces "
                          f"(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')", option=what)
    return token


def new_token() -> str:
    return secrets.token_urlsafe(32)


def load_secret(data_dir: Path) -> bytes:
    """The run secret that signs worker tokens: made once per data dir, kept for resumes."""
    path = data_dir / SECRET_FILE
    try:
        secret = path.read_bytes()
        if len(secret) >= 32:
            return secret
    except FileNotFoundError:
        pass
    secret = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, secret)
        os.fsync(fd)
    finally:
        os.close(fd)
    return secret


@dataclass(frozen=True)
class Access:
    """The credentials a coordinator accepts; ``Access()`` is an open coordinator."""

    admin_token: str | None = None
    join_token: str | None = None
    secret: bytes = b""

    def __post_init__(self) -> None:
        if self.join_token is not None and len(self.secret) < 32:
            raise ValueError("worker tokens need a secret of at least 32 bytes")

    @property
    def workers_need_tokens(self) -> bool:
        return self.join_token is not None

    def worker_token(self, worker_id: str) -> str | None:
        """The token that lets ``worker_id`` act as itself; None on an open coordinator."""
        if self.join_token is None:
            return None
        mac = hmac.new(self.secret, worker_id.encode(), hashlib.sha256).digest()
        return f"{worker_id}{SEPARATOR}{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"

    def worker_of(self, token: str) -> str | None:
        """The worker id a worker token is valid for, or None."""
        worker_id, sep, _ = token.partition(SEPARATOR)
        if not sep or not worker_id:
            return None
        expected = self.worker_token(worker_id)
        return worker_id if expected is not None and _same(token, expected) else None

    def is_admin(self, token: str | None) -> bool:
        return self.admin_token is None or (token is not None and _same(token, self.admin_token))

    def is_join(self, token: str | None) -> bool:
        return self.join_token is None or (token is not None and _same(token, self.join_token))


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


SESSION_PATH = f"{API}/session"
STATIC_PREFIX = "/static/"


def scope_of(method: str, path: str) -> Scope:
    """Which credential a request needs. Anything not named here is admin: closed by default."""
    if path in (f"{API}/health", "/login", "/logout", SESSION_PATH, "/openapi.json"):
        return "public"
    if method in ("GET", "HEAD") and _is_static(path):
        # The pages' stylesheets, scripts and icon are the package's own files, the same for everyone: no
        # secret in them. Open, so that the sign-in page wears the pages' look (style.css) instead of a copy.
        return "public"
    if path == f"{API}/workers" and method == "POST":
        return "join"
    if path in (f"{API}/model", f"{API}/plan"):
        return "model"  # a worker's, or the admin's to fetch the model (and what it means) by hand
    if path in (f"{API}/heartbeat", f"{API}/updates") or path.startswith(f"{API}/uploads") \
            or (path.startswith(_WORKER_PATH) and (path.endswith(("/task", "/description")) or method == "DELETE")):
        return "worker"
    return "admin"


def _is_static(path: str) -> bool:
    """One file of static/ (a name, no folder): the router serves nothing else under it."""
    name = path[len(STATIC_PREFIX):]
    return path.startswith(STATIC_PREFIX) and bool(name) and "/" not in name and "\\" not in name


def bearer(headers: list[tuple[bytes, bytes]]) -> tuple[str | None, str | None]:
    """The bearer token of the Authorization header and the admin cookie, if present."""
    token = cookie = None
    for key, value in headers:
        if key == b"authorization":
            scheme, _, rest = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and rest.strip():
                token = rest.strip()
        elif key == b"cookie":
            for part in value.decode("latin-1").split(";"):
                name, _, v = part.strip().partition("=")
                if name == COOKIE and v:
                    cookie = v
    return token, cookie


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def authenticated_worker(scope: MutableMapping[str, Any]) -> str | None:
    """The worker id the middleware authenticated this request as (None on an open coordinator)."""
    return scope.get("state", {}).get("fedfleet_worker")  # type: ignore[no-any-return]


def require_worker(scope: MutableMapping[str, Any], worker_id: str) -> None:
    """403 unless the request's worker token is ``worker_id``'s own (always passes when open)."""
    who = authenticated_worker(scope)
    if who is not None and who != worker_id:
        raise AuthError(f"this worker token belongs to worker {who!r}, not {worker_id!r}: a worker may only act "
                        "for itself", status=403, reason="forbidden")


def check(access: Access, method: str, path: str, headers: list[tuple[bytes, bytes]],
          state: dict[str, Any]) -> None:
    """Raise AuthError unless the request carries the credential its endpoint needs."""
    needed = scope_of(method, path)
    if needed == "public":
        return
    token, cookie = bearer(headers)
    if needed == "admin":
        if not access.is_admin(token) and not access.is_admin(cookie):
            _refuse(access, token or cookie, "the admin token")
        return
    if needed == "join":
        if not access.is_join(token):
            _refuse(access, token, "the join token")
        return
    if not access.workers_need_tokens:
        return
    if needed == "model" and access.admin_token is not None and (access.is_admin(token) or access.is_admin(cookie)):
        return
    who = access.worker_of(token) if token is not None else None
    if who is None:
        raise AuthError("this endpoint needs a worker token: the one returned by registration (POST /v1/workers)"
                        + (", and the one given is not valid for this run" if token else ""),
                        status=401, reason="unauthorized")
    if path.startswith(_WORKER_PATH) and path.endswith("/task"):
        claimed = path[len(_WORKER_PATH):-len("/task")]
        if claimed != who:
            raise AuthError(f"this worker token belongs to worker {who!r}, not {claimed!r}: a worker may only act "
                            "for itself", status=403, reason="forbidden")
    # A heartbeat speaks for all the workers of a process: its body carries each id's token, which
    # the route checks; the header's token only has to be one of them.
    state["fedfleet_worker"] = None if path == f"{API}/heartbeat" else who


def check_heartbeat(access: Access, worker_ids: list[str], tokens: list[str]) -> None:
    """A heartbeat speaks for several workers: each id must come with its own worker token."""
    if not access.workers_need_tokens:
        return
    if len(tokens) != len(worker_ids):
        raise AuthError(f"heartbeat has {len(worker_ids)} worker ids but {len(tokens)} tokens: each worker id "
                        "needs its worker token", status=401, reason="unauthorized")
    for i, (wid, token) in enumerate(zip(worker_ids, tokens, strict=True)):
        who = access.worker_of(token)
        if who is None:
            raise AuthError(f"tokens[{i}] is not a worker token of this run", status=401, reason="unauthorized")
        if who != wid:
            raise AuthError(f"tokens[{i}] belongs to worker {who!r}, not {wid!r}", status=403, reason="forbidden")


def check_reclaim(access: Access, worker_id: str, given: str | None) -> None:
    """Taking back a known worker id (and its partition) needs that worker's own token, not just the join token."""
    if access.workers_need_tokens and (given is None or access.worker_of(given) != worker_id):
        raise AuthError(f"worker id {worker_id!r} is registered already; only that worker, with its worker token "
                        f"in {WORKER_TOKEN_HEADER}, may take it back", status=403, reason="forbidden")


def _refuse(access: Access, given: str | None, what: str) -> None:
    if given is None:
        raise AuthError(f"this endpoint needs {what} as a bearer token (Authorization: Bearer TOKEN)", status=401,
                        reason="unauthorized")
    # A worker token used where the admin's is needed is a token in the wrong place, not a wrong token.
    if access.worker_of(given) is not None:
        raise AuthError(f"a worker token may not be used here: this endpoint needs {what}", status=403,
                        reason="forbidden")
    raise AuthError(f"the bearer token is not {what} of this coordinator", status=401, reason="unauthorized")


class AuthMiddleware:
    """Check every HTTP request against ``access`` before it reaches a route (and before its body is read).

    It also answers the browser's side of the admin token itself: the sign-in page (``/login``), sign-out
    (``/logout``) and ``/v1/session``, so that every app it wraps has them.
    """

    def __init__(self, app: ASGIApp, access: Access, secure_cookie: bool = False,
                 on_refused: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.access = access
        self.secure_cookie = secure_cookie
        self.on_refused = on_refused

    async def __call__(self, scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method, headers = scope["path"], scope["method"], scope.get("headers", [])
        if path == "/login":
            await self._login(scope, receive, send)
            return
        if path == "/logout":
            await self._logout(method, headers, send)
            return
        if path == SESSION_PATH and method in ("GET", "HEAD"):
            await self._session(headers, send)
            return
        state = scope.setdefault("state", {})
        try:
            check(self.access, method, path, headers, state)
        except AuthError as exc:
            self._refused(exc.reason or "unauthorized")
            if method == "GET" and "text/html" in (header(headers, b"accept") or ""):
                # A person opening a page: the sign-in form, which brings them back here; API clients
                # (Accept: application/json, fetch, curl) keep the JSON answer below.
                target = path + ("?" + scope["query_string"].decode("latin-1") if scope.get("query_string") else "")
                _, cookie = bearer(headers)
                # Being asked to sign in is no error; a cookie that no longer signs in, or a worker's token, is.
                page = sign_in_page(_refusal_text(exc, path, cookie is not None), safe_next(target),
                                    error=cookie is not None or exc.status == 403)
                await _send_page(send, exc.status, page, exc.status == 401)
                return
            await _send_error(send, exc)
            return
        await self.app(scope, receive, send)

    def _refused(self, reason: str) -> None:
        if self.on_refused is not None:
            self.on_refused(reason)

    def _signed_in(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """Whether the request carries the admin token (False on a coordinator without one: no sign-in)."""
        if self.access.admin_token is None:
            return False
        token, cookie = bearer(headers)
        return any(t is not None and self.access.is_admin(t) for t in (token, cookie))

    def _cookie(self, value: str, max_age: int | None = None) -> bytes:
        # Sign-out must send the same flags as sign-in, or a browser may keep the cookie it was given.
        flags = "; HttpOnly; SameSite=Strict; Path=/" + ("; Secure" if self.secure_cookie else "")
        age = f"; Max-Age={max_age}" if max_age is not None else ""
        return f"{COOKIE}={value}{age}{flags}".encode()

    async def _login(self, scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Any]],
                     send: Callable[[Any], Awaitable[None]]) -> None:
        """GET: a form asking for the admin token; POST: check it, set the cookie, go to ``next`` (the dashboard)."""
        headers = scope.get("headers", [])
        if scope["method"] != "POST":
            target = safe_next(parse_qs(scope.get("query_string", b"").decode("latin-1")).get("next", [""])[0])
            if self.access.admin_token is None or self._signed_in(headers):
                await _redirect(send, target)  # nothing to sign in to, or signed in already
                return
            page = sign_in_page("Sign in with the admin token of this coordinator.", target)
            await _send_page(send, 200, page)
            return
        form = await _read_form(receive)
        if form is None:
            await respond(send, 413, json.dumps({"detail": f"login form is over {FORM_LIMIT} bytes"}).encode(),
                          b"application/json")
            return
        target = safe_next(form.get("next", [""])[0])
        token = form.get("token", [""])[0].strip()
        if self.access.admin_token is None:
            await _redirect(send, target)
            return
        if not self.access.is_admin(token):
            self._refused("unauthorized")
            text = ("That is not the admin token of this coordinator: check it (the first line of the file given "
                    "to --admin-token-file) and try again." if token else "Enter the admin token to sign in.")
            await _send_page(send, 401, sign_in_page(text, target, error=True))
            return
        await _redirect(send, target, [(b"set-cookie", self._cookie(token))])

    async def _logout(self, method: str, headers: list[tuple[bytes, bytes]],
                      send: Callable[[Any], Awaitable[None]]) -> None:
        """POST: clear the admin cookie and go to the sign-in page."""
        if method != "POST":
            await respond(send, 405, json.dumps({"detail": "sign out with POST /logout (the pages' Sign out "
                                                           "button)"}).encode(),
                          b"application/json", [(b"allow", b"POST")])
            return
        # A page of another site could post here too: harmless but for the nuisance of being signed out, which
        # a browser's Origin header lets us refuse.
        origin, host = header(headers, b"origin"), header(headers, b"host")
        if origin is not None and host is not None and urlsplit(origin).netloc.lower() != host.lower():
            await respond(send, 403, json.dumps({"detail": f"sign-out from another site ({origin[:100]}) is "
                                                           "refused"}).encode(), b"application/json")
            return
        await _redirect(send, "/login", [(b"set-cookie", self._cookie("", max_age=0))])

    async def _session(self, headers: list[tuple[bytes, bytes]], send: Callable[[Any], Awaitable[None]]) -> None:
        body = {"auth": self.access.admin_token is not None, "signed_in": self._signed_in(headers)}
        await respond(send, 200, json.dumps(body).encode(), b"application/json")


FORM_LIMIT = 4096  # bytes of a sign-in form: a token, the page to go back to


async def _read_form(receive: Callable[[], Awaitable[Any]]) -> dict[str, list[str]] | None:
    """The urlencoded form of a request's body; None when it is over FORM_LIMIT."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > FORM_LIMIT:
            return None
        if not message.get("more_body"):
            return parse_qs(body.decode("latin-1"))


_UNSAFE_NEXT = re.compile(r"[\x00-\x20\x7f\\]")


def safe_next(target: str) -> str:
    """Where to go after signing in: a path of this site (``/predict?x=1``), else ``/``: never another site.

    Refused: absolute URLs (``https://evil.example``), scheme-relative ones (``//evil.example``), back
    slashes and control characters (which browsers read as ``/`` or drop, turning ``/\\evil`` into
    ``//evil``), and the sign-in and sign-out pages themselves.
    """
    if not target.startswith("/") or target.startswith("//") or len(target) > 2000 or _UNSAFE_NEXT.search(target):
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or parts.path in ("/login", "/logout"):
        return "/"
    return target


def _refusal_text(exc: AuthError, path: str, had_cookie: bool) -> str:
    """What a person opening ``path`` without the admin token is told (the API's wording is for programs)."""
    what = {"/": "the dashboard", "/predict": "the predict page"}.get(path, "this page")
    if exc.status == 403:
        return f"A worker token cannot open {what}: sign in with the admin token of this coordinator."
    if had_cookie:
        return (f"Your sign-in is no longer valid (the coordinator's admin token has changed). Sign in again to "
                f"see {what}.")
    return f"This coordinator is protected by an admin token. Sign in to see {what}."


async def _redirect(send: Callable[[Any], Awaitable[None]], location: str,
                    extra: list[tuple[bytes, bytes]] | None = None) -> None:
    # A path of this site only (safe_next), percent-encoded where a header may not hold it as it is.
    await respond(send, 303, b"", b"text/plain", [(b"location", quote(location, safe="/?&=%:@!$'()*+,;~-._").encode()),
                                                  *(extra or [])])


async def _send_page(send: Callable[[Any], Awaitable[None]], status: int, page: str, challenge: bool = False) -> None:
    extra = [(b"www-authenticate", b'Bearer realm="fedfleet"')] if challenge else []
    await respond(send, status, page.encode(), b"text/html; charset=utf-8", extra)


async def _send_error(send: Callable[[Any], Awaitable[None]], exc: AuthError) -> None:
    extra = [(b"www-authenticate", b'Bearer realm="fedfleet"')] if exc.status == 401 else []
    await respond(send, exc.status, json.dumps({"detail": str(exc)}).encode(), b"application/json", extra)


def sign_in_page(message: str, next_path: str, error: bool = False) -> str:
    """The sign-in page: ``message`` above the form, which sends the token and ``next_path`` to POST /login.

    Both are escaped: the message may quote the request (a path), and ``next_path`` is the request's own.
    """
    kind = "signin-msg error" if error else "signin-msg"
    return SIGN_IN_PAGE.format(kind=kind, message=html.escape(message), next=html.escape(next_path, quote=True),
                               role=' role="alert"' if error else "")


LOCAL_NAMES = ("localhost", "*.localhost")
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-.*:[]_")


def parse_allowed_hosts(text: str) -> tuple[str, ...]:
    """``--allowed-hosts``: comma-separated host names or addresses, ``*.example.org`` for every subdomain."""
    names = tuple(n.strip().lower().rstrip(".") for n in text.split(",") if n.strip())
    for name in names:
        bare = name[2:] if name.startswith("*.") else name
        if not bare or "*" in bare or not set(bare) <= _HOST_CHARS:
            raise ConfigError(f"The 'allowed-hosts' option must be comma-separated host names (or *.NAME for all "
                              f"names under NAME). Got {name!r} instead.", option="allowed-hosts")
    return names


def host_name(value: str) -> str:
    """The name part of a Host header (no port, no brackets), lower case, without a trailing dot."""
    value = value.strip().lower()
    if value.startswith("["):
        name = value[1:value.find("]")] if "]" in value else value[1:]
    elif value.count(":") == 1:
        name = value.partition(":")[0]
    else:
        name = value  # a bare IPv6 address (no port), or a name
    return name.rstrip(".")


def host_matches(name: str, patterns: Iterable[str]) -> bool:
    for pattern in patterns:
        if pattern.startswith("*."):
            if name.endswith(pattern[1:]) and len(name) > len(pattern) - 1:
                return True
        elif name == pattern:
            return True
    return False


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostCheck:
    """Answer only requests for this coordinator's own names: the defence against DNS rebinding.

    A browser sends the name it was given in ``Host``; a page of evil.example whose DNS name turns to
    127.0.0.1 reaches a loopback coordinator, but with ``Host: evil.example``. Allowed: localhost and
    ``*.localhost``, the name the coordinator is bound to, ``allowed``, and every IP address: an
    address cannot be rebound, and a page whose origin is the address is the coordinator's own (so
    Kubernetes probes and port forwards to an address keep working). A request without ``Host``
    (HTTP/1.0) is no browser's and passes. Refused with 421 and a message naming the Host and
    ``--allowed-hosts``.
    """

    def __init__(self, app: ASGIApp, bound: str, allowed: Iterable[str] = ()) -> None:
        self.app = app
        self.patterns = (*LOCAL_NAMES, host_name(bound), *allowed)
        self.tally = Tally()

    def allows(self, host: str | None) -> bool:
        if host is None:
            return True
        name = host_name(host)
        return _is_ip(name) or host_matches(name, self.patterns)

    async def __call__(self, scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] == "http":
            host = header(scope.get("headers", []), b"host")
            if not self.allows(host):
                self.tally.add("coordinator.host_refused", host=(host or "")[:100])
                detail = (f"Host {host!r} is not a name of this coordinator: without an admin token it answers only "
                          "localhost, IP addresses and its own --host (against DNS rebinding). Add the name with "
                          "--allowed-hosts, or set an admin token")
                await respond(send, 421, json.dumps({"detail": detail}).encode(), b"application/json")
                return
        await self.app(scope, receive, send)


# Assets by absolute path: this page answers any path a browser opened (/, /predict, /v1/status), and a
# relative one would resolve against it.
SIGN_IN_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>fedfleet · sign in</title>
  <link rel="icon" href="/static/favicon.svg" type="image/svg+xml">
  <link rel="stylesheet" href="/static/style.css">
  <link rel="stylesheet" href="/static/session.css">
</head>
<body>
  <header class="top">
    <div class="brand"><img src="/static/favicon.svg" alt="" width="26" height="26"> fedfleet</div>
  </header>
  <main class="signin">
    <section class="panel">
      <h1>Sign in</h1>
      <p id="signin-message" class="{kind}"{role}>{message}</p>
      <form method="post" action="/login">
        <input type="hidden" name="next" value="{next}">
        <label for="token">Admin token</label>
        <input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
        <button type="submit" class="primary">Sign in</button>
      </form>
      <p class="hint">The token is the first line of the file the coordinator was started with
        (<code>--admin-token-file</code>) or its <code>FEDFLEET_ADMIN_TOKEN</code>. This browser keeps it in a
        cookie that scripts cannot read, until you sign out.</p>
    </section>
  </main>
</body>
</html>
"""
