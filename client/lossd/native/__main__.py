"""``python -m lossd.native``: build the client's native transport ahead (an image's build
stage, a machine set up once) and print where it is."""

import sys

from lossd.native import TRANSPORT, NativeUnavailable

try:
    print(TRANSPORT.build())
except NativeUnavailable as exc:
    sys.exit(f"lossd.native: cannot build the client's native transport: {exc}")
