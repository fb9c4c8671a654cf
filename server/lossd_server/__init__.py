"""lossd_server: the lossd gRPC service (install with ``lossd[server]``).

The functional core (``catalogue``, ``losses``, ``reduce``, ``validate``, ``engine``) is
plain torch and knows nothing of gRPC; ``servicer`` and ``app`` put it on the wire.
``plugins`` is the public API for losses of your own.
"""

__version__ = "0.1.0"
