"""The native front: gRPC C++ carries the calls, lossd's Python handlers answer them.

``lossd serve --front native`` (``auto`` picks it where it builds). See
:mod:`lossd_server.native.server` for how a call runs and :mod:`lossd_server.native.build`
for how the C++ module is built.
"""

from lossd_server.native.build import NativeUnavailable, build, load
from lossd_server.native.server import NativeContext, NativeServer, TlsPems

__all__ = ["NativeContext", "NativeServer", "NativeUnavailable", "TlsPems", "build", "load"]
