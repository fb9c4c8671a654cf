"""Channel set-up both clients build their channel from: the address to dial (:func:`dial`:
lossd's default port, URL schemes), options (message limit, keepalive, retries, load
balancing), TLS credentials and the bearer-token metadata.

No calls are made here. ``lossd.channel`` publishes the names for callers that open
their own channel with the clients' configuration (bench/).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc

DEFAULT_TIMEOUT = 60.0
"""Default deadline of unary calls (seconds); streams have none unless asked."""
KEEPALIVE_SECONDS = 30.0
"""Keepalive ping interval; servers accept pings from every 10 s (--min-client-ping-seconds)."""
RETRY_ATTEMPTS = 5
SERVICE = "lossd.v1.LossService"
# Idempotent methods: evaluating is a pure function of the request, so a call refused with
# UNAVAILABLE (server unreachable, draining, connection lost before an answer) is safely
# sent again. gRPC retries a stream only until its first response arrived (and while the
# sent messages fit its 256 KiB retry buffer); after that an UNAVAILABLE stream fails.
# SharedMemorySession is a stateful session and is not retried.
RETRIED_METHODS = ("Evaluate", "EvaluateStream", "ListLosses")

ENV_TOKEN = "LOSSD_TOKEN"
ENV_TLS_CA = "LOSSD_TLS_CA"
# Not LOSSD_TLS_CERT/LOSSD_TLS_KEY: those are the server's own --tls-cert/--tls-key.
ENV_TLS_CERT = "LOSSD_TLS_CLIENT_CERT"
ENV_TLS_KEY = "LOSSD_TLS_CLIENT_KEY"
ENV_TLS_SERVER_NAME = "LOSSD_TLS_SERVER_NAME"


def service_config(*, load_balancing: str = "round_robin",
                   retry_attempts: int = RETRY_ATTEMPTS, initial_backoff: float = 0.1,
                   max_backoff: float = 2.0, backoff_multiplier: float = 2.0) -> str:
    """The gRPC service config (JSON): load balancing across every resolved address and
    retries with exponential backoff on UNAVAILABLE for the idempotent methods.

    >>> cfg = json.loads(service_config())
    >>> cfg["loadBalancingConfig"], cfg["methodConfig"][0]["retryPolicy"]["maxAttempts"]
    ([{'round_robin': {}}], 5)
    """
    config: dict[str, Any] = {"loadBalancingConfig": [{load_balancing: {}}]}
    if retry_attempts > 1:
        config["methodConfig"] = [{
            "name": [{"service": SERVICE, "method": m} for m in RETRIED_METHODS],
            "retryPolicy": {
                "maxAttempts": retry_attempts,
                "initialBackoff": f"{initial_backoff:g}s",
                "maxBackoff": f"{max_backoff:g}s",
                "backoffMultiplier": backoff_multiplier,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }]
    return json.dumps(config)


def channel_options(max_message_bytes: int, *, keepalive_seconds: float = KEEPALIVE_SECONDS,
                    load_balancing: str = "round_robin",
                    retry_attempts: int = RETRY_ATTEMPTS,
                    server_name: str | None = None) -> list[tuple[str, Any]]:
    """The gRPC channel options of both clients: the send limit, no receive limit, the
    :func:`service_config`, keepalive pings and the TLS name override."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", -1),
        ("grpc.service_config", service_config(load_balancing=load_balancing,
                                               retry_attempts=retry_attempts)),
        ("grpc.enable_retries", 1 if retry_attempts > 1 else 0),
        # The service config above wins over one published in DNS TXT records.
        ("grpc.service_config_disable_resolution", 1),
        # A connection of its own: grpc otherwise shares one among the channels of a process
        # that have the same target and options, so every client of a threaded job would
        # reach the same serving process of a server run with ``--processes``.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    if keepalive_seconds > 0:
        options += [
            ("grpc.keepalive_time_ms", int(keepalive_seconds * 1000)),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return options


DEFAULT_PORT = 50051
"""lossd's gRPC port (``lossd serve --port``): an address without a port dials it (gRPC's
own default would be 443)."""
TLS_PORT = 443
"""The port of an ``https://`` or ``grpcs://`` address without one (an ingress, a load
balancer)."""
_SCHEMES = {"http": False, "grpc": False, "https": True, "grpcs": True}
"""URL schemes accepted in an address, and whether each means TLS."""
_GRPC_SCHEMES = ("dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds")
"""gRPC's own target schemes: passed to gRPC as they are (dns: gets the default port)."""


def _with_port(host: str, port: int) -> str:
    """``host`` with ``:port`` added when it has none (IPv6 literals bracketed)."""
    if host.startswith("["):
        return host if not host.endswith("]") else f"{host}:{port}"
    if host.count(":") > 1:  # a bare IPv6 literal, no room for a port
        return f"[{host}]:{port}"
    name, colon, given = host.partition(":")
    return host if colon and given else f"{name}:{port}"


def dial(target: str, tls: bool | None = None) -> tuple[str, bool | None]:
    """The gRPC target to dial for the clients' ``target``, and ``tls`` with what the
    address's scheme says (None: as the certificates say).

    ``host`` or ``host:port`` (the port defaults to 50051, lossd's); ``http://`` and
    ``grpc://host[:port]`` are plaintext, ``https://`` and ``grpcs://host[:port]`` TLS
    (port 443 by default); gRPC's own targets (``dns:///host:port``, ``ipv4:...``,
    ``unix:path``) pass unchanged. A scheme that contradicts ``tls`` is a ValueError, and
    so is any other scheme.

    >>> dial("127.0.0.1")
    ('127.0.0.1:50051', None)
    >>> dial("http://lossd:50051/")
    ('lossd:50051', False)
    >>> dial("https://lossd.example.com")
    ('lossd.example.com:443', True)
    """
    scheme, sep, rest = target.partition("://")
    if not sep:
        prefix = target.partition(":")[0].lower()
        if prefix == "dns":  # dns:host[:port]
            return f"dns:{_with_port(target[4:], DEFAULT_PORT)}", tls
        if prefix in _GRPC_SCHEMES:
            return target, tls
        return _with_port(target, DEFAULT_PORT), tls
    scheme = scheme.lower()
    if scheme == "dns":  # dns://authority/host[:port]
        authority, _, host = rest.partition("/")
        return f"dns://{authority}/{_with_port(host, DEFAULT_PORT)}", tls
    if scheme in _GRPC_SCHEMES:
        return target, tls
    if scheme not in _SCHEMES:
        raise ValueError(f"address {target!r}: unknown scheme {scheme}://; give host:port "
                         "(plaintext), http://host:port, https://host[:port] (TLS) or a gRPC "
                         "target (dns:///host:port, ipv4:host:port, unix:path)")
    host, _, path = rest.partition("/")
    if path or not host:
        raise ValueError(f"address {target!r}: a gRPC address is host:port, no path")
    means = _SCHEMES[scheme]
    if tls is not None and tls != means:
        raise ValueError(f"address {target!r} means {'TLS' if means else 'plaintext'}, but "
                         f"tls={tls}")
    return _with_port(host, TLS_PORT if means else DEFAULT_PORT), means


PemSource = str | os.PathLike[str] | bytes | None


def _pem(value: PemSource, env: Mapping[str, str], var: str, what: str) -> bytes | None:
    """PEM bytes from bytes, a file path, or (when ``value`` is None) the file named by
    ``env[var]``."""
    if value is None:
        path = env.get(var) or None
        if path is None:
            return None
        value, what = path, f"{what} (from {var})"
    if isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {os.fspath(value)}: {exc.strerror}") from None


def channel_credentials(*, root_certificates: PemSource = None,
                        certificate_chain: PemSource = None, private_key: PemSource = None,
                        tls: bool | None = None, env: Mapping[str, str] | None = None
                        ) -> grpc.ChannelCredentials | None:
    """TLS credentials, or None for plaintext.

    Each PEM option is bytes or a file path; one left out comes from the file named by
    ``LOSSD_TLS_CA``, ``LOSSD_TLS_CLIENT_CERT`` or ``LOSSD_TLS_CLIENT_KEY``. TLS is on when
    ``tls`` is True or (``tls`` None) when any PEM is given; without a root CA the system's
    roots apply. A client certificate (mutual TLS) needs both chain and key.
    """
    env = os.environ if env is None else env
    ca = _pem(root_certificates, env, ENV_TLS_CA, "root_certificates")
    chain = _pem(certificate_chain, env, ENV_TLS_CERT, "certificate_chain")
    key = _pem(private_key, env, ENV_TLS_KEY, "private_key")
    if (chain is None) != (key is None):
        raise ValueError("certificate_chain and private_key go together (mutual TLS)")
    if tls is False:
        if ca or chain:
            raise ValueError("tls=False (or an http:// address) with TLS certificates "
                             "given")
        return None
    if tls is None and ca is None and chain is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                        certificate_chain=chain)


@dataclasses.dataclass(frozen=True)
class ChannelSetup:
    """What both clients build their channel from: options, credentials, call metadata."""

    options: list[tuple[str, Any]]
    credentials: grpc.ChannelCredentials | None
    metadata: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, *, max_message_bytes: int, token: str | None, root_certificates: PemSource,
           certificate_chain: PemSource, private_key: PemSource, tls: bool | None,
           server_name: str | None, retry_attempts: int, keepalive_seconds: float,
           load_balancing: str, env: Mapping[str, str] | None) -> ChannelSetup:
        env = os.environ if env is None else env
        if load_balancing not in ("round_robin", "pick_first"):
            raise ValueError(f"load_balancing={load_balancing!r}: round_robin or pick_first")
        options = channel_options(
            max_message_bytes, keepalive_seconds=keepalive_seconds,
            load_balancing=load_balancing, retry_attempts=retry_attempts,
            server_name=server_name or env.get(ENV_TLS_SERVER_NAME) or None)
        credentials = channel_credentials(
            root_certificates=root_certificates, certificate_chain=certificate_chain,
            private_key=private_key, tls=tls, env=env)
        token = token if token is not None else env.get(ENV_TOKEN) or None
        if token is not None and (not token.strip() or any(c in token for c in "\r\n")):
            raise ValueError("token: empty or contains a line break")
        metadata = (("authorization", f"Bearer {token.strip()}"),) if token else ()
        return cls(options, credentials, metadata)


_INTERCEPTORS: tuple[type, ...] = (
    grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor)


class MetadataInterceptor(*_INTERCEPTORS):  # type: ignore[misc]
    """Adds fixed metadata (the bearer token) to every call on a channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=(*(details.metadata or ()), *self._metadata))

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any,
                              request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any,
                               request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any,
                               request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any,
                                request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)
