"""Two losses for lossd, each a torch function returning torch's ``reduction='none'``
output. Importing this module registers them (``lossd_server.plugins.register``).

* ``charbonnier``: sqrt((input - target)^2 + eps^2), a smooth L1 of image restoration and
  optical flow. Targets are values shaped as the input.
* ``knowledge_distillation``: Hinton et al.'s distillation of a student (the predictions,
  logits (N, C, d1, ...)) from a teacher (the extra input ``teacher``, logits of the same
  shape) and the true classes (class-index targets, so lossd checks their range and
  honours ``ignore_index``):

      alpha * T^2 * KL(softmax(teacher / T) || softmax(input / T)) + (1 - alpha) * CE(input, target)

  per position, the KL summed over the classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lossd_server.plugins import Input, Option, loss, register

Tensor = torch.Tensor


def charbonnier(input: Tensor, target: Tensor, *, eps: float) -> Tensor:
    """Charbonnier loss, elementwise (like reduction='none')."""
    return torch.sqrt((input - target) ** 2 + eps ** 2)


register("charbonnier", charbonnier, options={"eps": 1e-3}, targets="values",
         description="Charbonnier (smooth L1) loss: sqrt((input - target)^2 + eps^2)")


def _in_unit_interval(value: float) -> str | None:
    return None if 0.0 <= value <= 1.0 else f"must be in [0, 1], got {value}"


def _positive(value: float) -> str | None:
    return None if value > 0 else f"must be > 0, got {value}"


@loss(targets="classes",
      inputs={"teacher": Input("float", "predictions", "the teacher's logits, shaped as the "
                                                       "student's (the predictions)")},
      options={"temperature": Option(2.0, "softens both distributions", check=_positive),
               "alpha": Option(0.5, "weight of the distillation term; 1 - alpha weighs the "
                                    "cross entropy with the true classes",
                               check=_in_unit_interval)},
      prediction_shapes=("(N, C)", "(N, C, d1, ...)"))
def knowledge_distillation(input: Tensor, target: Tensor, *, teacher: Tensor,
                           temperature: float, alpha: float) -> Tensor:
    """Knowledge distillation (Hinton et al.): KL to the softened teacher plus cross entropy."""
    t = temperature
    soft = F.kl_div(F.log_softmax(input / t, dim=1), F.log_softmax(teacher / t, dim=1),
                    log_target=True, reduction="none").sum(dim=1)
    hard = F.cross_entropy(input, target, reduction="none")
    return alpha * t * t * soft + (1 - alpha) * hard
