#!/usr/bin/env bash
# Set up .venv/ at the repo root to one of three levels, each including the one before it;
# idempotent and quick when nothing changed (a stamp per level holds the hash of what it
# was made from). `make serve` asks for serve, `make lint`/`make dist`/`make bench` for dev,
# `make test` (and so CI) for test.
#
#   serve  torch and the project with its `server` extra (editable): what `lossd serve` needs,
#          nothing else. No plugin: `lossd serve` serves the built-ins and what you install.
#          With it, the native front's build tools (scripts/bootstrap_native.sh).
#   dev    + the `dev` extra (pytest, ruff, mypy, build, the test-only libraries).
#   test   + the Debian packages the tests use (scripts/bootstrap_system.sh: prometheus,
#          chromium) and the deploy lint tools in .venv/tools/ (scripts/bootstrap_tools.sh).
#
# torch: on a machine with no NVIDIA driver, install the pinned CPU build
# (LOSSD_TORCH_SPEC, default "torch==2.13.0"), so a CPU box never pulls GBs of CUDA
# wheels. With a driver, the open range from pyproject ("torch>=2.4") brings a CUDA build.
# Override with LOSSD_TORCH_SPEC and, for another wheel index, LOSSD_TORCH_INDEX_URL.
set -euo pipefail
cd "$(dirname "$0")/.."

level=${1:-test}
case "$level" in
    serve | dev | test) ;;
    *) echo "usage: scripts/bootstrap.sh [serve|dev|test]" >&2; exit 2 ;;
esac

PYTHON=${PYTHON:-python3}
VENV=.venv
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

if [ -e /proc/driver/nvidia/version ] || command -v nvidia-smi >/dev/null 2>&1; then
    torch_spec=${LOSSD_TORCH_SPEC:-"torch>=2.4"}
else
    torch_spec=${LOSSD_TORCH_SPEC:-"torch==2.13.0"}
fi
torch_args=()
if [ -n "${LOSSD_TORCH_INDEX_URL:-}" ]; then
    torch_args=(--index-url "$LOSSD_TORCH_INDEX_URL")
fi

# The hash of what a level is made from; a stamp holding another hash means "redo".
made_from() {
    (cat pyproject.toml constraints.txt scripts/bootstrap.sh; echo "$torch_spec"
     echo "${LOSSD_TORCH_INDEX_URL:-}"; echo "$@") | sha256sum | cut -d' ' -f1
}
stale() { [ "$(cat "$VENV/.lossd-$1" 2>/dev/null)" != "$(made_from "$1")" ]; }
done_with() { made_from "$1" > "$VENV/.lossd-$1"; }

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi

if stale serve; then
    echo "bootstrap: installing $torch_spec into $VENV" >&2
    "${pip[@]}" "${torch_args[@]}" "$torch_spec"
    echo "bootstrap: installing lossd[server] into $VENV" >&2
    "${pip[@]}" -c constraints.txt -e ".[server]"
    # Set-ups before the levels installed the example plugin here, where its losses would
    # clash with a user's (the README's Plugins walkthrough); its tests install it for
    # themselves (tests/conftest.py).
    if "$VENV/bin/python" -m pip show --quiet lossd-example-plugin >/dev/null 2>&1; then
        echo "bootstrap: removing the example plugin from $VENV" >&2
        "$VENV/bin/python" -m pip uninstall --quiet --yes lossd-example-plugin
    fi
    rm -f "$VENV/.lossd-setup"  # the single stamp of those set-ups
    done_with serve
fi
# The native front's build tools and its module (idempotent, quick when built).
VENV=$VENV bash scripts/bootstrap_native.sh
[ "$level" = serve ] && exit 0

if stale dev; then
    echo "bootstrap: installing lossd[server,dev] into $VENV" >&2
    "${pip[@]}" -c constraints.txt -e ".[server,dev]"
    done_with dev
fi
[ "$level" = dev ] && exit 0

# Each script is idempotent and skips what is already there.
bash scripts/bootstrap_system.sh
bash scripts/bootstrap_tools.sh
