"""The example plugin's losses: the functions against torch written out independently, and
through a real lossd server with the plugin loaded (as `lossd serve --plugin` loads it).

Run them from the plugin's directory with ``pytest`` (they need lossd[server] installed);
lossd's own test run includes them. The plugin is imported by the ``losses`` fixture, not
at collection: importing it registers its losses in the process, and lossd's test run
(whose environment never has the plugin installed) keeps them out of its other servers.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

import lossd
from lossd import LossClient
from lossd_server.app import LossdServer, create_server
from lossd_server.settings import Settings

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def losses() -> Iterator[ModuleType]:
    """``lossd_example_plugin.losses``, imported (so registered): the installed package, or
    ``src/`` where the plugin is not installed (lossd's own test run)."""
    with pytest.MonkeyPatch.context() as patch:
        if importlib.util.find_spec("lossd_example_plugin") is None:
            patch.syspath_prepend(str(SRC))
        yield importlib.import_module("lossd_example_plugin.losses")


@pytest.fixture(scope="module")
def client(losses: ModuleType) -> Iterator[LossClient]:
    """A lossd server on a free port with the plugin loaded by name, and a client to it."""
    settings = Settings(host="127.0.0.1", port=0, metrics_port=-1, device="cpu",
                        plugins=("lossd_example_plugin.losses",))
    server: LossdServer = create_server(settings).start()
    try:
        with LossClient(f"127.0.0.1:{server.port}", timeout=60) as c:
            yield c
    finally:
        server.stop(0)


def reference_distillation(x: torch.Tensor, t: torch.Tensor, teacher: torch.Tensor,
                           temperature: float, alpha: float) -> torch.Tensor:
    """Hinton et al.'s loss per position, from the formula (not from the plugin)."""
    p_teacher = torch.softmax(teacher / temperature, dim=1)
    log_student = torch.log_softmax(x / temperature, dim=1)
    kl = (p_teacher * (torch.log(p_teacher) - log_student)).sum(dim=1)
    ce = -torch.log_softmax(x, dim=1).gather(1, t.unsqueeze(1)).squeeze(1)
    return alpha * temperature ** 2 * kl + (1 - alpha) * ce


def test_charbonnier_is_the_formula(losses: ModuleType) -> None:
    x, t = torch.tensor([0.0, 3.0, -1.0]), torch.tensor([0.0, -1.0, -1.5])
    got = losses.charbonnier(x, t, eps=0.5)
    want = torch.tensor([0.5, (16 + 0.25) ** 0.5, (0.25 + 0.25) ** 0.5])
    torch.testing.assert_close(got, want)


def test_distillation_is_the_formula(losses: ModuleType) -> None:
    g = torch.Generator().manual_seed(0)
    x, teacher = torch.randn(5, 4, 3, generator=g), torch.randn(5, 4, 3, generator=g)
    t = torch.randint(0, 4, (5, 3), generator=g)
    got = losses.knowledge_distillation(x, t, teacher=teacher, temperature=3.0, alpha=0.25)
    torch.testing.assert_close(got, reference_distillation(x, t, teacher, 3.0, 0.25))


def test_listed_with_their_options_inputs_and_targets(client: LossClient) -> None:
    infos = {info.name: info for info in client.losses()}
    charb, kd = infos["charbonnier"], infos["knowledge_distillation"]
    assert charb.targets == "values" and kd.targets == "classes"
    assert [(o.name, o.type, o.default) for o in charb.options] == [
        ("eps", "float", "0.001"), ("nan_policy", "str", "propagate")]
    assert [i.name for i in kd.inputs] == ["teacher"]
    assert {o.name for o in kd.options} == {"temperature", "alpha", "ignore_index",
                                            "nan_policy"}
    assert "lossd_example_plugin.losses" in kd.source


def test_charbonnier_served(client: LossClient) -> None:
    g = torch.Generator().manual_seed(1)
    x, t, w = torch.randn(64, 3, generator=g), torch.randn(64, 3, generator=g), torch.rand(64)
    r = client.evaluate(x, t, loss="charbonnier", weights=w, eps=0.1)
    want = torch.sqrt((x - t) ** 2 + 0.01).mean(dim=1)
    torch.testing.assert_close(torch.from_numpy(r.per_sample), want, rtol=1e-6, atol=1e-7)
    assert r.weighted_mean == pytest.approx(float((w.double() * want.double()).sum()
                                                  / w.double().sum()), rel=1e-6)


def test_distillation_served_with_ignored_positions(client: LossClient) -> None:
    g = torch.Generator().manual_seed(2)
    x, teacher = torch.randn(8, 5, 6, generator=g), torch.randn(8, 5, 6, generator=g)
    t = torch.randint(0, 5, (8, 6), generator=g)
    t[0] = -100  # every position ignored: no loss, counted in `ignored`
    t[1, :3] = -100
    r = client.evaluate(x, t, loss="knowledge_distillation", inputs={"teacher": teacher},
                        temperature=2.0, alpha=0.7)
    per_position = reference_distillation(x, t.clamp(min=0), teacher, 2.0, 0.7)
    valid = t != -100
    want = (per_position * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1)
    torch.testing.assert_close(torch.from_numpy(r.per_sample), want, rtol=1e-5, atol=1e-6)
    assert (r.count, r.ignored) == (7, 1)


def test_bad_requests_name_the_field(client: LossClient) -> None:
    x, classes = np.zeros((2, 3), np.float32), np.array([0, 1])
    cases = [
        ((x, np.array([0, 3])), {"inputs": {"teacher": x}}, "targets: class index 3 out of "
                                                            "range [0, 3)"),
        ((x, classes), {}, "inputs.teacher: missing"),
        ((x, classes), {"inputs": {"teacher": x}, "alpha": 2.0},
         "options.alpha: must be in [0, 1]"),
        ((x, classes), {"inputs": {"teacher": x[:, :2]}}, "inputs.teacher: shape (2, 2) does "
                                                          "not match predictions (2, 3)"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(lossd.InvalidArgument) as info:
            client.evaluate(*args, loss="knowledge_distillation", **kwargs)
        assert info.value.message.startswith(message), info.value.message
    with pytest.raises(lossd.InvalidArgument) as info:
        client.evaluate(x, x, loss="charbonnier", eps="small")
    assert info.value.message.startswith("options.eps: expected float, got str")


def test_gradient_through_the_plugin(client: LossClient) -> None:
    """Remote autograd: the server differentiates the plugin's torch function."""
    g = torch.Generator().manual_seed(3)
    x, teacher = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    t = torch.randint(0, 4, (6,), generator=g)
    r = client.evaluate(x, t, loss="knowledge_distillation", inputs={"teacher": teacher},
                        gradient="mean")
    leaf = x.clone().requires_grad_(True)
    reference_distillation(leaf, t, teacher, 2.0, 0.5).mean().backward()
    assert r.gradient is not None
    torch.testing.assert_close(torch.from_numpy(r.gradient), leaf.grad, rtol=1e-5, atol=1e-6)
