"""API keys for ``convlens serve``: ``Authorization: Bearer KEY`` on every route but a few.

Keys come from ``--api-key`` (or the ``CONVLENS_API_KEY`` environment variable) and
``--api-key-file`` (one key per line; blank lines and ``#`` comments are skipped). A request's
key is compared with every configured key by :func:`hmac.compare_digest`, all of them every
time, so neither the timing nor the number of comparisons says how much of a key was right.

Open without a key: ``/health`` (for load balancers), the page (``/`` and ``/static/``: it loads,
then asks for the key when the API answers 401) and the API docs (``/docs``, ``/redoc``,
``/openapi.json``, whose description then leaves the class names out; the docs' "Authorize"
button sends the key). Everything else, ``/model`` and ``/metrics`` included, needs a key.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Sequence
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from convlens.errors import ConfigError
from convlens.serve.responses import error_response

ENV_API_KEY = "CONVLENS_API_KEY"
OPEN_PATHS = frozenset({"/health", "/", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
OPEN_PREFIXES = ("/static/", "/static-offline-docs/")


def check_key(key: str, where: str) -> str:
    """A usable key, or a one-line :class:`ConfigError` naming where it came from."""
    if not key or not key.strip():
        raise ConfigError(f"{where}: the API key is empty; give a non-empty key (e.g. from "
                          "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        raise ConfigError(f"{where}: an API key must be printable ASCII without spaces "
                          "(it travels in an HTTP header). Received: a key of "
                          f"{len(key)} characters")
    return key


def read_key_file(path: str | os.PathLike[str]) -> list[str]:
    """The keys in ``path``, one per line. An unreadable file or one with no key is an error."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise ConfigError(f"--api-key-file {str(p)!r} cannot be read ({reason}); give a readable "
                          "UTF-8 text file with one key per line") from e
    keys = [line.strip() for line in text.splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise ConfigError(f"--api-key-file {str(p)!r} holds no key; write one key per line")
    return [check_key(k, f"--api-key-file {str(p)!r} line {i + 1}") for i, k in enumerate(keys)]


def collect_keys(api_key: str | None, api_key_file: str | os.PathLike[str] | None,
                 environ: dict[str, str] | os._Environ[str] | None = None) -> list[str]:
    """Every accepted key: ``api_key`` (else ``$CONVLENS_API_KEY``) and the file's keys."""
    environ = os.environ if environ is None else environ
    keys: list[str] = []
    if api_key is not None:
        keys.append(check_key(api_key, "--api-key"))
    elif ENV_API_KEY in environ:
        keys.append(check_key(environ[ENV_API_KEY], ENV_API_KEY))
    if api_key_file is not None:
        keys.extend(read_key_file(api_key_file))
    return list(dict.fromkeys(keys))


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


class KeyCheck:
    """Compares a presented key with every configured key in constant time."""

    def __init__(self, keys: Sequence[str]) -> None:
        if not keys:
            raise ValueError("KeyCheck needs at least one key")
        self._keys = [k.encode("ascii") for k in keys]

    def __call__(self, presented: bytes) -> bool:
        # A list, not any(): every key is compared, whichever matches.
        return any([hmac.compare_digest(presented, k) for k in self._keys])


def bearer_token(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    """The token of an ``Authorization: Bearer TOKEN`` header, or None."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" and token.strip() else None
    return None


class ApiKeyMiddleware:
    """Pure ASGI middleware: 401 (JSON body, ``WWW-Authenticate: Bearer``) without a valid key."""

    def __init__(self, app: ASGIApp, check: KeyCheck) -> None:
        self.app = app
        self.check = check

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope.get("headers", []))
        if token is not None and self.check(token):
            await self.app(scope, receive, send)
            return
        message = ("this server needs an API key: send the header 'Authorization: Bearer KEY'" if token is None
                   else "the API key is not valid; send one of the server's keys as 'Authorization: Bearer KEY'")
        await error_response(401, "unauthorized", message,
                             headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
