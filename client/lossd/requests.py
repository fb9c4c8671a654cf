"""Request building, public for callers that make the calls themselves (bench/): the
clients' request builder, serialised ``EvaluateRequest`` messages split as the clients
split them, and their limits.

    from lossd.requests import DEFAULT_MAX_MESSAGE_BYTES, Requests
    messages = Requests(DEFAULT_MAX_MESSAGE_BYTES).build("cross_entropy", logits, targets,
                                                         None, None, {})
"""

from lossd._requests import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_SPLIT_BYTES,
    ENVELOPE_BYTES,
    Batch,
    Requests,
    analysis_fields,
)

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "DEFAULT_SPLIT_BYTES", "ENVELOPE_BYTES", "Batch",
           "Requests", "analysis_fields"]
