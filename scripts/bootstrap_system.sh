#!/usr/bin/env bash
# Debian packages the tests use: prometheus (the server and promtool) for the scrape tests,
# chromium and chromium-driver (a real headless browser renders `lossd eval --report` pages).
# Called by `scripts/bootstrap.sh test` (make test), never for `make serve`. Installed only
# where missing, and only where apt-get can run (root, or sudo without a password);
# elsewhere the tests that need them say what to install.
set -euo pipefail

missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium chromium-driver)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
else
    echo "bootstrap: cannot install ${missing[*]} (not root); the tests that need them will skip" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: no apt-get; install ${missing[*]} by hand for the tests that need them" >&2
    exit 0
fi
echo "bootstrap: apt-get install ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
# --no-install-recommends keeps it to the programs themselves; no service is started here.
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
