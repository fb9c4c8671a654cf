"""Channel set-up, public for callers that open their own channel or stub with the
clients' configuration (bench/): channel options, service config, TLS credentials, and
the translation of a ``grpc.RpcError`` into lossd's typed errors.

    channel = grpc.insecure_channel(address, options=channel_options(64 << 20))
"""

from lossd._channel import (
    DEFAULT_TIMEOUT,
    KEEPALIVE_SECONDS,
    RETRY_ATTEMPTS,
    ChannelSetup,
    channel_credentials,
    channel_options,
    service_config,
)
from lossd._errors import from_rpc_error

__all__ = ["DEFAULT_TIMEOUT", "KEEPALIVE_SECONDS", "RETRY_ATTEMPTS", "ChannelSetup",
           "channel_credentials", "channel_options", "from_rpc_error", "service_config"]
