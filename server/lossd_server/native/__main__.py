"""``python -m lossd_server.native``: build the native front's module now (as a container
image build or a set-up script does), print where it is; exit 1 saying why it cannot."""

import sys

from lossd_server.native.build import NativeUnavailable, build

try:
    print(build())
except NativeUnavailable as exc:
    print(f"native front unavailable: {exc}", file=sys.stderr)
    sys.exit(1)
