#!/usr/bin/env bash
# Set up .venv/ at the repo root with everything lossd needs; idempotent and quick when
# nothing changed. Used by `make serve` and `make test` (and so by CI).
#
# torch: on a machine with no NVIDIA driver, install the pinned CPU build
# (LOSSD_TORCH_SPEC, default "torch==2.13.0"), so a CPU box never pulls GBs of CUDA
# wheels. With a driver, the open range from pyproject ("torch>=2.4") brings a CUDA build.
# Override with LOSSD_TORCH_SPEC and, for another wheel index, LOSSD_TORCH_INDEX_URL.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.lossd-setup
want="$(cat pyproject.toml constraints.txt scripts/bootstrap*.sh examples/plugin/pyproject.toml \
         2>/dev/null | sha256sum | cut -d' ' -f1)"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
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
    echo "bootstrap: installing $torch_spec into $VENV" >&2
    "${pip[@]}" "${torch_args[@]}" "$torch_spec"
    echo "bootstrap: installing lossd[server,dev] into $VENV" >&2
    "${pip[@]}" -c constraints.txt -e ".[server,dev]"
    # The example plugin (examples/plugin), installed as a user installs one: the test run
    # serves its losses through its entry point, with no flag.
    echo "bootstrap: installing the example plugin into $VENV" >&2
    "${pip[@]}" -c constraints.txt -e examples/plugin
    echo "$want" > "$STAMP"
fi

# System packages (e.g. Debian's prometheus for the scrape test) and lint tools kept out of
# the main environment; each script is idempotent and skips what is already there.
for extra in scripts/bootstrap_system.sh scripts/bootstrap_tools.sh; do
    if [ -f "$extra" ]; then
        bash "$extra"
    fi
done
