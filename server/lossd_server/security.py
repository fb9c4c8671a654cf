"""TLS, mutual TLS and bearer tokens for the server.

* ``server_credentials(settings)``: gRPC server credentials from ``--tls-cert``/``--tls-key``
  (and ``--tls-client-ca`` for mutual TLS, which then requires a client certificate), or
  None for plaintext.
* :class:`TokenStore`: the accepted bearer tokens, from ``--auth-tokens-file`` (re-read when
  the file changes, so tokens rotate without a restart) and the variable named by
  ``--auth-tokens-env`` (``LOSSD_AUTH_TOKENS`` by default), several at once. ``check`` takes
  the call's metadata and compares in constant time.

No token ever reaches a log line, a metric or an error message: the settings hold the file
path and the variable name only, and the stored tokens are SHA-256 digests.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import grpc

from lossd_server.settings import Settings

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
BEARER = "bearer "


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{flag}: cannot read {path}: {exc.strerror}") from None


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings, or None when TLS is off (plaintext)."""
    pems = tls_pems(settings)
    if pems is None:
        return None
    key, cert, client_ca = pems
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def tls_pems(settings: Settings) -> tuple[bytes, bytes, bytes | None] | None:
    """The PEMs of the server's TLS (private key, certificate chain, client CA bundle or
    None), each checked; None when TLS is off."""
    if not settings.tls:
        return None
    cert = _read(settings.tls_cert, "--tls-cert")
    key = _read(settings.tls_key, "--tls-key")
    if b"-----BEGIN" not in cert:
        raise ValueError(f"--tls-cert: {settings.tls_cert} is not a PEM certificate")
    if b"PRIVATE KEY-----" not in key:
        raise ValueError(f"--tls-key: {settings.tls_key} is not a PEM private key")
    client_ca = None
    if settings.tls_client_ca:
        client_ca = _read(settings.tls_client_ca, "--tls-client-ca")
        if b"-----BEGIN" not in client_ca:
            raise ValueError(f"--tls-client-ca: {settings.tls_client_ca} is not a PEM bundle")
    return key, cert, client_ca


def parse_tokens(text: str, *, separators: str = ",\n") -> list[str]:
    """Tokens from text: split on ``separators``, stripped; blanks and ``#`` lines dropped.

    >>> parse_tokens("a, b\\n# old\\n\\nc", separators=",\\n")
    ['a', 'b', 'c']
    """
    tokens = [text]
    for sep in separators:
        tokens = [part for t in tokens for part in t.split(sep)]
    return [t.strip() for t in tokens if t.strip() and not t.strip().startswith("#")]


def _digest(token: str | bytes) -> bytes:
    raw = token.encode() if isinstance(token, str) else token
    return hashlib.sha256(raw).digest()


class TokenStore:
    """Accepted bearer tokens; ``enabled`` when at least one is configured.

    Tokens are kept as SHA-256 digests and compared with ``hmac.compare_digest`` against
    every accepted one (no early exit, no length leak). ``file`` is re-read at most once
    per ``reload_seconds`` when its modification time or size changed; a file that turns
    empty or unreadable keeps the previous tokens (and logs a warning), so a botched
    rotation never opens the server.
    """

    def __init__(self, *, file: str = "", env_name: str = "",
                 env: Mapping[str, str] | None = None, reload_seconds: float = 1.0) -> None:
        self.file = file
        self.reload_seconds = reload_seconds
        self._lock = threading.Lock()
        self._env_digests: list[bytes] = []
        self._file_digests: list[bytes] = []
        self._file_stamp: tuple[float, int] | None = None
        self._checked_at = 0.0
        env = os.environ if env is None else env
        if env_name and env_name in env:
            tokens = parse_tokens(env[env_name])
            if not tokens:
                raise ValueError(f"{env_name} is set but holds no token; unset it to run "
                                 "without authentication")
            self._env_digests = [_digest(t) for t in tokens]
        if file:
            self._load_file(initial=True)

    @classmethod
    def from_settings(cls, settings: Settings,
                      env: Mapping[str, str] | None = None) -> TokenStore:
        return cls(file=settings.auth_tokens_file, env_name=settings.auth_tokens_env, env=env)

    @property
    def enabled(self) -> bool:
        return bool(self.file or self._env_digests)

    @property
    def count(self) -> int:
        """How many tokens are accepted now (for logs: a count, never a value)."""
        self._maybe_reload()
        with self._lock:
            return len(self._env_digests) + len(self._file_digests)

    def _load_file(self, *, initial: bool = False) -> None:
        try:
            st = os.stat(self.file)
            stamp = (st.st_mtime, st.st_size)
            if stamp == self._file_stamp:
                return
            tokens = parse_tokens(Path(self.file).read_text())
        except (OSError, UnicodeDecodeError) as exc:
            if initial:
                raise ValueError(f"--auth-tokens-file: cannot read {self.file}: {exc}") from None
            log.warning("auth tokens file unreadable; keeping the previous tokens",
                        extra={"error": type(exc).__name__})
            return
        if not tokens:
            if initial:
                raise ValueError(f"--auth-tokens-file: {self.file} holds no token")
            log.warning("auth tokens file holds no token; keeping the previous tokens")
            return
        with self._lock:
            self._file_digests = [_digest(t) for t in tokens]
            self._file_stamp = stamp
        if not initial:
            log.info("auth tokens reloaded", extra={"tokens": len(tokens)})

    def _maybe_reload(self) -> None:
        if not self.file:
            return
        now = time.monotonic()
        if now - self._checked_at < self.reload_seconds:
            return
        self._checked_at = now
        self._load_file()

    def check_token(self, token: str | bytes) -> bool:
        """True when ``token`` is one of the accepted tokens (constant time per token)."""
        self._maybe_reload()
        given = _digest(token)
        with self._lock:
            accepted = self._env_digests + self._file_digests
        ok = False
        for digest in accepted:
            ok |= hmac.compare_digest(given, digest)
        return ok

    def check(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
        """None when the call's metadata carries an accepted bearer token, else the reason."""
        values = [v for k, v in (metadata or ()) if k == AUTHORIZATION]
        if not values:
            return "missing 'authorization: Bearer <token>' metadata"
        if len(values) > 1:
            return "more than one authorization header"
        value = values[0]
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        if text[:len(BEARER)].lower() != BEARER:
            return "authorization metadata is not 'Bearer <token>'"
        if not self.check_token(text[len(BEARER):].strip()):
            return "bearer token not accepted"
        return None
