"""The MLServer model of the MLServer peer (``bench.mlserver``): lossd's cross_entropy.

It runs inside MLServer's own virtualenv (never imported by lossd or its tests) and speaks
what lossd's Open Inference Protocol endpoint speaks for ``cross_entropy``: inputs
``PREDICTIONS`` (FP32 [N, C]) and ``TARGETS`` (INT64 [N]), outputs ``PER_SAMPLE`` (FP32
[N]), ``SUM`` and ``MEAN`` (FP64 [1]), so one benchmark client measures both servers. The
loss is torch's, as lossd's is; the aggregates are float64 sums (not lossd's exact ones).
"""

import numpy as np
import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class CrossEntropy(MLModel):  # type: ignore[misc]
    async def load(self) -> bool:
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        inputs = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        logits = torch.from_numpy(np.ascontiguousarray(inputs["PREDICTIONS"], np.float32))
        targets = torch.from_numpy(np.ascontiguousarray(inputs["TARGETS"], np.int64))
        with torch.inference_mode():
            losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        per_sample = losses.numpy()
        total = per_sample.astype(np.float64).sum()
        return InferenceResponse(model_name=self.name, outputs=[
            NumpyCodec.encode_output("PER_SAMPLE", per_sample),
            NumpyCodec.encode_output("SUM", np.array([total])),
            NumpyCodec.encode_output("MEAN", np.array([total / len(per_sample)])),
        ])
