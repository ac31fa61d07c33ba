"""Building an etcd3 client from a list of endpoints.

Endpoints are ``host:port`` strings, optionally with an ``http://`` or
``https://`` scheme, given as a list or as one comma-separated string (the
form of ``ETCD_ENDPOINTS`` and of etcdctl's ``--endpoints``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import etcd3
import grpc

from ._errors import InvalidArgumentError, InvalidTypeError, translate
from ._retry import Deadline, retry_transient

DEFAULT_ENDPOINT = "127.0.0.1:2379"
ENDPOINTS_VARIABLE = "ETCD_ENDPOINTS"

# Unlimited responses, so that a large directory can be read in one range;
# gRPC keepalive pings (no more often than etcd's default
# --grpc-keepalive-min-time of 5 s allows) to notice a dead connection; and
# reconnection attempts at least every second: gRPC's default backoff grows
# to two minutes, during which a channel fails every request with its last
# error although etcd is back.
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]

# python3-etcd3 shuns an endpoint for this long after an error. The transport
# does its own failover, so the client's bookkeeping must never shun one.
_NEVER_SHUN = 0.0


@dataclass(frozen=True)
class Endpoint:
    """One parsed endpoint."""

    host: str
    port: int
    tls: bool

    @property
    def netloc(self) -> str:
        """``host:port``, bracketing an IPv6 address."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_endpoints(endpoints: str | Sequence[str] | None) -> list[Endpoint]:
    """Parse endpoints; None reads ``ETCD_ENDPOINTS``, then uses ``127.0.0.1:2379``.

    Raises:
        InvalidTypeError: ``endpoints`` is neither a string nor a sequence of them.
        InvalidArgumentError: An endpoint cannot be parsed.
    """
    if endpoints is None:
        endpoints = os.environ.get(ENDPOINTS_VARIABLE) or DEFAULT_ENDPOINT
    if isinstance(endpoints, str):
        items = endpoints.split(",")
    elif isinstance(endpoints, Sequence) and all(isinstance(e, str) for e in endpoints):
        items = [part for e in endpoints for part in e.split(",")]
    else:
        raise InvalidTypeError(f"endpoints must be a str or a list of str, not {endpoints!r}")
    parsed = [_parse_one(item.strip()) for item in items if item.strip()]
    if not parsed:
        raise InvalidArgumentError("no etcd endpoints given")
    return parsed


def _parse_one(text: str) -> Endpoint:
    split = urlsplit(text if "://" in text else f"//{text}")
    if split.scheme not in ("", "http", "https"):
        raise InvalidArgumentError(f"endpoint {text!r}: unknown scheme {split.scheme!r}")
    try:
        port = split.port or 2379
    except ValueError as exc:
        raise InvalidArgumentError(f"endpoint {text!r}: bad port") from exc
    if not split.hostname or split.path not in ("", "/"):
        raise InvalidArgumentError(f"endpoint {text!r} is not host:port")
    return Endpoint(split.hostname, port, split.scheme == "https")


def build_client(
    endpoints: list[Endpoint],
    *,
    timeout: float,
    ca_cert: str | None,
    cert_key: str | None,
    cert_cert: str | None,
    user: str | None,
    password: str | None,
) -> Any:
    """Create a python3-etcd3 client for ``endpoints``.

    TLS is used when ``ca_cert`` is given or an endpoint says ``https://``.
    With ``user`` and ``password``, the client authenticates at once.

    Raises:
        InvalidArgumentError: Inconsistent TLS or credential arguments.
        EtcdUnavailableError: Authentication could not reach etcd in time.
        PermissionDeniedError: The credentials were refused.
    """
    if (cert_key is None) != (cert_cert is None):
        raise InvalidArgumentError("cert_key and cert_cert must be given together")
    if cert_key is not None and ca_cert is None:
        raise InvalidArgumentError("a client certificate needs ca_cert as well")
    if (user is None) != (password is None):
        raise InvalidArgumentError("user and password must be given together")
    credentials: grpc.ChannelCredentials | None = None
    if ca_cert is not None:
        credentials = etcd3.MultiEndpointEtcd3Client.get_secure_creds(ca_cert, cert_key, cert_cert)
    elif any(e.tls for e in endpoints):
        credentials = grpc.ssl_channel_credentials()
    netlocs = [e.netloc for e in endpoints]

    def create() -> Any:
        channels = [
            etcd3.Endpoint(
                # etcd3 joins host and port as they are: an IPv6 address
                # needs its brackets, or gRPC cannot parse the target.
                f"[{e.host}]" if ":" in e.host else e.host,
                e.port,
                secure=credentials is not None,
                creds=credentials,
                time_retry=_NEVER_SHUN,
                opts=_CHANNEL_OPTIONS,
            )
            for e in endpoints
        ]
        try:
            return etcd3.MultiEndpointEtcd3Client(
                endpoints=channels,
                timeout=timeout,
                user=user,
                password=password,
                failover=len(channels) > 1,
            )
        except grpc.RpcError as exc:
            for channel in channels:
                channel.close()
            error = translate(exc, endpoints=netlocs, write=False)
            if error is None:  # pragma: no cover - translate handles every RpcError
                raise
            raise error from exc

    return retry_transient(Deadline(timeout), write=False)(create)
