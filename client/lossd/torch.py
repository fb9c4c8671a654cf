"""Remote autograd: a loss computed by a lossd server that backpropagates locally.

Needs torch (``import lossd`` does not). One round trip per forward returns the loss and
its gradient with respect to the predictions; ``backward()`` then needs no call::

    from lossd.torch import RemoteLoss

    remote = RemoteLoss("127.0.0.1:50051", "cross_entropy", label_smoothing=0.1)
    loss = remote(logits, targets)   # value and gradient from the server
    loss.backward()                  # logits.grad is the server's gradient

The cost: the predictions travel to the server and the gradient (same size) comes back, so
a step pays about twice the payload on the wire; in exchange the job ships no loss code and
the server's device does the work. The gradient is only asked for when the predictions
require grad and grad mode is on.
"""

from __future__ import annotations

from typing import Any

import torch

from lossd._client import LossClient
from lossd._result import LossResult

__all__ = ["RemoteLoss"]

_VALUE = {"mean": "mean", "sum": "sum", "weighted_mean": "weighted_mean",
          "weighted_sum": "weighted_sum"}


class _Remote(torch.autograd.Function):
    """Returns ``value``; its gradient w.r.t. ``predictions`` is the precomputed one."""

    @staticmethod
    def forward(ctx: Any, predictions: torch.Tensor, value: torch.Tensor,
                gradient: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gradient)
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (gradient,) = ctx.saved_tensors
        return grad_output * gradient, None, None


class RemoteLoss(torch.nn.Module):
    """A ``torch.nn.Module`` whose loss and gradient are computed by a lossd server.

    ``client``: a :class:`~lossd.LossClient`, or the server's address as ``LossClient``
    takes it ("host:port"), for which a ``LossClient`` with default settings is made.
    ``reduction``: "mean" (over samples that count, see the per-sample rule), "sum",
    "weighted_mean" or "weighted_sum" (these two need ``weights`` in ``forward``).
    ``options`` are the loss's options, as for ``LossClient.evaluate``.
    """

    def __init__(self, client: LossClient | str, loss: str = "cross_entropy", *,
                 reduction: str = "mean", tag: str | None = None,
                 timeout: float | None = None, **options: Any) -> None:
        super().__init__()
        if reduction not in _VALUE:
            raise ValueError(f"reduction={reduction!r}: one of {', '.join(_VALUE)}")
        if isinstance(client, str):
            client = LossClient(client)
        elif not callable(getattr(client, "evaluate", None)):
            raise TypeError(f"client: a LossClient or the server's address ('host:port'), "
                            f"not a {type(client).__name__}")
        self.client = client
        self.loss = loss
        self.reduction = reduction
        self.tag = tag
        self.timeout = timeout
        self.options = options
        self.last_result: LossResult | None = None

    def forward(self, predictions: torch.Tensor, targets: Any = None, weights: Any = None,
                inputs: dict[str, Any] | None = None) -> torch.Tensor:
        """The loss of the batch; ``inputs`` are the loss's extra tensors (no gradient
        flows to them: the server differentiates with respect to the predictions)."""
        wants_grad = predictions.requires_grad and torch.is_grad_enabled()
        result = self.client.evaluate(
            predictions.detach(), targets, loss=self.loss, weights=weights,
            inputs=None if inputs is None else {k: v.detach() if isinstance(v, torch.Tensor)
                                                else v for k, v in inputs.items()},
            tag=self.tag, timeout=self.timeout,
            gradient=self.reduction if wants_grad else None, **self.options)
        self.last_result = result
        value = getattr(result, _VALUE[self.reduction])
        if value is None:
            raise ValueError(f"reduction={self.reduction!r} needs weights")
        out = torch.tensor(value, dtype=predictions.dtype, device=predictions.device)
        if not wants_grad:
            return out
        assert result.gradient is not None
        gradient = torch.from_numpy(result.gradient).to(predictions.device, predictions.dtype)
        return _Remote.apply(predictions, out, gradient)  # type: ignore[no-any-return,no-untyped-call]
