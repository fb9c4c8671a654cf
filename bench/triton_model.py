"""The Triton model of the Triton peer (``bench.triton``): lossd's cross_entropy.

It runs inside Triton's python backend stub, in the Triton virtualenv (never imported by
lossd or its tests), and speaks what lossd's Open Inference Protocol endpoint speaks for
``cross_entropy``: inputs ``PREDICTIONS`` (FP32 [N, C]) and ``TARGETS`` (INT64 [N]),
outputs ``PER_SAMPLE`` (FP32 [N]), ``SUM`` and ``MEAN`` (FP64 [1]). The loss is torch's
(``reduction='none'``), as lossd's is; the aggregates are float64 sums (not lossd's exact
ones), as the MLServer peer's are.
"""

import json

import numpy as np
import torch
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]


class TritonPythonModel:
    """One request at a time per instance (``max_batch_size: 0``: no dynamic batching)."""

    def initialize(self, args: dict) -> None:  # type: ignore[type-arg]
        """Takes the intra-op thread count the config's ``torch_threads`` gives."""
        params = json.loads(args["model_config"]).get("parameters", {})
        if "torch_threads" in params:
            torch.set_num_threads(int(params["torch_threads"]["string_value"]))

    def execute(self, requests: list) -> list:  # type: ignore[type-arg]
        responses = []
        for request in requests:
            logits = pb_utils.get_input_tensor_by_name(request, "PREDICTIONS").as_numpy()
            targets = pb_utils.get_input_tensor_by_name(request, "TARGETS").as_numpy()
            with torch.inference_mode():
                losses = torch.nn.functional.cross_entropy(
                    torch.from_numpy(logits), torch.from_numpy(targets), reduction="none")
            per_sample = losses.numpy()
            total = per_sample.astype(np.float64).sum()
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("PER_SAMPLE", per_sample),
                pb_utils.Tensor("SUM", np.array([total])),
                pb_utils.Tensor("MEAN", np.array([total / len(per_sample)])),
            ]))
        return responses
