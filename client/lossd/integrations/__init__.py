"""lossd inside training code: each framework in its own module, imported on its own.

``lossd.integrations.lightning.LossdCallback`` (PyTorch Lightning),
``lossd.integrations.hf.LossdMetrics`` (Hugging Face Trainer's ``compute_metrics``) and
``lossd.integrations.torchmetrics.LossdMetric`` (a torchmetrics ``Metric``) stream a whole
evaluation to a lossd server from a background thread and report its metrics; none keeps
the predictions. This package imports no framework (nor torch): importing one of those
modules imports its framework. What they share is :mod:`lossd.integrations._stream`.
"""

from lossd.integrations._stream import LossdWarning, flat_metrics

__all__ = ["LossdWarning", "flat_metrics"]
