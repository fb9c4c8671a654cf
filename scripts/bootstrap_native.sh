#!/usr/bin/env bash
# What the native gRPC front (`lossd serve --front native`, picked by the default `auto`)
# and the client's native transport (`LossClient(transport=)`) build from: a C++ compiler,
# pkg-config and gRPC C++ (Debian's libgrpc++-dev). Called
# by `scripts/bootstrap.sh serve` (and so by every level). Installed only where missing
# and where apt-get can run (root, or sudo without a password); elsewhere `lossd serve`
# says why it serves with grpcio instead. Then builds both modules once (cached).
set -euo pipefail
VENV=${VENV:-.venv}

if ! { command -v "${CXX:-c++}" >/dev/null 2>&1 && pkg-config --exists grpc++ 2>/dev/null; }; then
    if [ "$(id -u)" -eq 0 ]; then
        sudo=()
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo=(sudo -n)
    else
        echo "bootstrap: cannot install g++ pkg-config libgrpc++-dev (not root); lossd serve" \
             "will use its grpcio front" >&2
        exit 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "bootstrap: no apt-get; install a C++ compiler, pkg-config and gRPC C++ for" \
             "the native front (else lossd serve uses its grpcio front)" >&2
        exit 0
    fi
    echo "bootstrap: apt-get install g++ pkg-config libgrpc++-dev" >&2
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends g++ pkg-config libgrpc++-dev \
        >/dev/null
fi
if ! "$VENV/bin/python" -m lossd_server.native >/dev/null; then
    echo "bootstrap: the native front did not build (above); lossd serve uses grpcio" >&2
fi
if ! "$VENV/bin/python" -m lossd.native >/dev/null; then
    echo "bootstrap: the client's native transport did not build (above); LossClient uses" \
         "grpcio" >&2
fi
