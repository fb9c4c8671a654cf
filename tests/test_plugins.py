"""Plugins (lossd_server.plugins): registration, loading, start-up failures, evaluation
failures, and a plugin loss served with everything a built-in gets, through real servers.

Plugin modules are written to a temporary directory put on ``sys.path`` (in-process) or on
``PYTHONPATH`` (``lossd serve`` in a subprocess), as a user's package would be installed.
The example plugin (examples/plugin) is pip-installed into a directory of its own
(conftest's ``example_plugin_dir``), never into .venv.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import connected, metric_value, restored_registry, served, start_server

import lossd
from lossd import LossClient
from lossd.kserve.v2 import grpc_service_pb2 as kpb
from lossd.kserve.v2 import grpc_service_pb2_grpc as kpb_grpc
from lossd_server import plugins
from lossd_server.app import LossdServer
from lossd_server.catalogue import LOSSES, Input, Option, register
from lossd_server.errors import RegistrationError
from lossd_server.settings import Settings, add_arguments, from_args

Tensor = torch.Tensor


@pytest.fixture
def registry() -> Iterator[None]:
    with restored_registry():
        yield


def write_module(directory: Path, name: str, source: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(source))


def identity(input: Tensor, target: Tensor) -> Tensor:
    return (input - target).abs()


# ---------------------------------------------------------------------------------------
# register(): what a declaration must be


def test_register_the_documented_form(registry: None) -> None:
    def charbonnier(input: Tensor, target: Tensor, *, eps: float) -> Tensor:
        return torch.sqrt((input - target) ** 2 + eps ** 2)

    spec = register("testplugin_charbonnier", charbonnier, options={"eps": 1e-3},
                    targets="values", description="Charbonnier (smooth L1) loss")
    assert LOSSES["testplugin_charbonnier"] is spec
    assert [(o.name, o.type.value, o.default) for o in spec.options] == [("eps", "float", 1e-3)]
    assert spec.targets.value == "values" and not spec.class_targets
    assert spec.source == __name__


def test_option_types_come_from_the_defaults(registry: None) -> None:
    def fn(input: Tensor, target: Tensor, **options: Any) -> Tensor:
        return input

    spec = register("testplugin_types", fn, targets="classes", options={
        "f": 0.5, "i": 3, "b": True, "s": "mean", "t": None,
        "c": Option("a", "a choice", choices=("a", "b"))})
    assert {o.name: o.type.value for o in spec.options} == {
        "f": "float", "i": "int", "b": "bool", "s": "str", "t": "tensor", "c": "str"}
    assert spec.class_targets and spec.engine_ignore_index


@pytest.mark.parametrize(("kwargs", "problem"), [
    ({"name": "mse_loss"}, "loss 'mse_loss' is already registered (by lossd)"),
    ({"name": "has space"}, "loss name 'has space'"),
    ({"name": ""}, "loss name ''"),
    ({"options": {"w": [1.0, 2.0]}}, "option 'w': unsupported default [1.0, 2.0] (list)"),
    ({"options": {"w": torch.ones(2)}}, "option 'w': unsupported default"),
    ({"options": {"reduction": "none"}}, "option name 'reduction' is reserved"),
    ({"options": {"nan_policy": "omit"}}, "option name 'nan_policy' is reserved"),
    ({"options": {"not-an-identifier": 1.0}}, "not a Python identifier"),
    ({"options": {"c": Option("x", choices=("a", "b"))}}, "default 'x' is not one of"),
    ({"options": {"c": Option(1, choices=("a",))}}, "choices are for str options"),
    ({"targets": "labels"}, "targets='labels'; one of values, classes"),
    ({"inputs": {"var": "matrix"}}, "input 'var': 'matrix'; an Input or one of"),
    ({"inputs": {"eps": "values"}, "options": {"eps": 0.1}}, "input 'eps' clashes with "
                                                             "option 'eps'"),
    ({"inputs": {"Var": "values", "var": "values"}}, "input 'var' clashes with input 'Var'"),
    ({"fn": lambda input: input}, "cannot be called as fn(input, target)"),
    ({"fn": lambda input, target: input, "options": {"eps": 1.0}},
     "cannot be called as fn(input, target, eps=...)"),
    ({"fn": "not callable"}, "fn is a str, not callable"),
    ({"min_prediction_dims": 3, "max_prediction_dims": 2}, "prediction dims [3, 2] is empty"),
])
def test_bad_declarations_are_refused(registry: None, kwargs: dict[str, Any],
                                      problem: str) -> None:
    args: dict[str, Any] = {"name": "testplugin_bad", "fn": identity, "options": {},
                            "targets": "values", **kwargs}
    before = list(LOSSES)
    with pytest.raises(RegistrationError) as info:
        register(args.pop("name"), args.pop("fn"), **args)
    assert problem in str(info.value), str(info.value)
    assert list(LOSSES) == before


def test_decorator_registers_under_the_function_name(registry: None) -> None:
    @plugins.loss(options={"delta": 1.0}, targets="values",
                  inputs={"scale": Input("float", "sample", "one scale per sample")})
    def testplugin_scaled(input: Tensor, target: Tensor, *, scale: Tensor,
                          delta: float) -> Tensor:
        """Scaled error."""
        return (input - target).abs() * scale.reshape(-1, *[1] * (input.dim() - 1)) + delta

    spec = LOSSES["testplugin_scaled"]
    assert spec.fn is testplugin_scaled and spec.description == "Scaled error."
    assert [(i.name, i.dtype, i.shape) for i in spec.inputs] == [("scale", "float", "sample")]


# ---------------------------------------------------------------------------------------
# Loading


def test_load_modules_once_and_by_function(registry: None, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    write_module(tmp_path, "testplugin_mod", """
        from lossd_server.plugins import register
        register("testplugin_a", lambda x, t: (x - t).abs(), options={}, targets="values")
    """)
    write_module(tmp_path, "testplugin_hook", """
        from lossd_server.plugins import register
        def setup():
            register("testplugin_b", lambda x, t: (x - t).abs(), options={}, targets="values")
    """)
    loaded = plugins.load(["testplugin_mod", " testplugin_hook:setup "], entry_points=False)
    assert [(p.target, p.origin, p.losses) for p in loaded] == [
        ("testplugin_mod", "--plugin", ("testplugin_a",)),
        ("testplugin_hook:setup", "--plugin", ("testplugin_b",))]
    assert LOSSES["testplugin_a"].source == "testplugin_mod (--plugin)"
    # Every server of the process loads its plugins: the second time nothing happens.
    assert plugins.load(["testplugin_mod", "testplugin_hook:setup"], entry_points=False) == []


def with_pythonpath(*directories: Path) -> dict[str, str]:
    """This process's environment with ``directories`` first on ``PYTHONPATH``."""
    path = [*map(str, directories), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def test_entry_points_load_the_installed_example(example_plugin_dir: Path) -> None:
    """The example plugin, pip-installed into a directory on PYTHONPATH, is found through
    its entry point, in a fresh process; without entry points it is not."""
    code = ("import sys\n"
            "from lossd_server import plugins\n"
            "for p in plugins.load([], entry_points=sys.argv[1] == 'on'):\n"
            "    print(p.target, '|', p.origin, '|', ','.join(p.losses))\n")
    env = with_pythonpath(example_plugin_dir)
    on = subprocess.run([sys.executable, "-c", code, "on"], capture_output=True, text=True,
                        timeout=60, check=True, env=env).stdout
    assert ("lossd_example_plugin.losses | entry point 'example' of lossd-example-plugin "
            "0.1.0 | charbonnier,knowledge_distillation") in on.splitlines()
    off = subprocess.run([sys.executable, "-c", code, "off"], capture_output=True, text=True,
                         timeout=60, check=True, env=env).stdout
    assert off == ""


@pytest.mark.parametrize(("source", "target", "problem"), [
    ("raise RuntimeError('no GPU driver here')", "testplugin_broken",
     "cannot import 'testplugin_broken': RuntimeError: no GPU driver here"),
    ("import testplugin_no_such_dependency", "testplugin_broken",
     "ModuleNotFoundError: No module named 'testplugin_no_such_dependency'"),
    (None, "testplugin_missing_module_name", "cannot import 'testplugin_missing_module_name'"),
    ("from lossd_server.plugins import register\n"
     "register('testplugin_ok', lambda x, t: x, options={}, targets='values')\n"
     "register('cross_entropy', lambda x, t: x, options={}, targets='classes')",
     "testplugin_broken", "loss 'cross_entropy' is already registered (by lossd)"),
    ("from lossd_server.plugins import register\n"
     "register('testplugin_x', lambda x, t, *, w: x, options={'w': (1, 2)}, "
     "targets='values')", "testplugin_broken",
     "option 'w': unsupported default (1, 2) (tuple)"),
    ("", "testplugin_broken:setup", "module 'testplugin_broken' has no 'setup'"),
    ("setup = 3", "testplugin_broken:setup", "'setup' is a int, not a function to call"),
    ("def setup():\n    raise KeyError('k')", "testplugin_broken:setup",
     "setup() raised KeyError"),
])
def test_a_plugin_that_cannot_load_names_itself_and_the_problem(
        registry: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str | None,
        target: str, problem: str) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    if source is not None:
        (tmp_path / "testplugin_broken.py").write_text(source)
    before = list(LOSSES)
    with pytest.raises(plugins.PluginError) as info:
        plugins.load([target], entry_points=False)
    message = str(info.value)
    assert message.startswith(f"plugin {target!r} (--plugin): "), message
    assert problem in message, message
    assert list(LOSSES) == before  # what it registered before failing is taken back
    assert target not in plugins._loaded


def _serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(tmp_path), "LOSSD_PORT": "0",
                   "LOSSD_METRICS_PORT": "-1", "LOSSD_DEVICE": "cpu", **(env or {})}
    return subprocess.run([sys.executable, "-m", "lossd_server.serve", *args],
                          env=environment, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(("source", "args", "env", "message"), [
    ("import testplugin_absent_dependency", ["--plugin", "testplugin_bad"], {},
     "lossd: plugin 'testplugin_bad' (--plugin): cannot import 'testplugin_bad': "
     "ModuleNotFoundError"),
    ("from lossd_server.plugins import register\n"
     "register('mse_loss', lambda x, t: x, options={}, targets='values')", [],
     {"LOSSD_PLUGINS": "testplugin_bad"},
     "lossd: plugin 'testplugin_bad' (--plugin): loss 'mse_loss' is already registered"),
    ("from lossd_server.plugins import register\n"
     "register('testplugin_y', lambda x, t, *, w: x, options={'w': [0.5]}, targets='values')",
     ["--plugin", "testplugin_bad"], {},
     "lossd: plugin 'testplugin_bad' (--plugin): loss 'testplugin_y', option 'w': "
     "unsupported default [0.5] (list)"),
], ids=["fails-to-import", "taken-name-from-env", "unsupported-option-type"])
def test_lossd_serve_refuses_to_start(tmp_path: Path, source: str, args: list[str],
                                      env: dict[str, str], message: str) -> None:
    (tmp_path / "testplugin_bad.py").write_text(source)
    proc = _serve(tmp_path, "--processes", "1", *args, env=env)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr, proc.stderr


CLASH_FIX = ("rename one of the two, or serve one only: `lossd serve --no-entry-points "
             "--plugin MODULE` loads just the modules named, no installed entry point")


def test_a_name_clash_names_both_plugins_and_the_fix(registry: None, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    write_module(tmp_path, "testplugin_one", """
        from lossd_server.plugins import register
        register("testplugin_same", lambda x, t: (x - t).abs(), options={}, targets="values")
    """)
    (tmp_path / "testplugin_two.py").write_text(
        (tmp_path / "testplugin_one.py").read_text())
    plugins.load(["testplugin_one"], entry_points=False)
    with pytest.raises(plugins.PluginError) as info:
        plugins.load(["testplugin_two"], entry_points=False)
    assert str(info.value) == (
        "plugin 'testplugin_two' (--plugin): loss 'testplugin_same' is already registered (by "
        "testplugin_one (--plugin)) and testplugin_two (--plugin) registers it again: "
        + CLASH_FIX)
    with pytest.raises(RegistrationError) as err:
        register("mse_loss", identity, options={}, targets="values")
    assert str(err.value) == ("loss 'mse_loss' is already registered (by lossd): a built-in's "
                              "name; give the new loss another name")


def test_the_readme_plugin_beside_the_example_names_both(tmp_path: Path,
                                                         example_plugin_dir: Path) -> None:
    """The Plugins walkthrough's package (a loss named charbonnier, an entry point) installed
    next to the example plugin: ``lossd serve`` exits 2 naming both packages and the fix."""
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    write_module(tmp_path / "mypkg", "losses", """
        import torch
        from lossd_server.plugins import register
        register("charbonnier", lambda x, t, *, eps: torch.sqrt((x - t) ** 2 + eps ** 2),
                 options={"eps": 1e-3}, targets="values")
    """)
    dist_info = tmp_path / "mypkg-0.1.dist-info"  # what pip installs for the package
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: mypkg\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[lossd.losses]\nmypkg = mypkg.losses\n")
    proc = _serve(tmp_path, "--processes", "1",
                  env=with_pythonpath(tmp_path, example_plugin_dir))
    assert proc.returncode == 2, proc.stderr
    assert ("lossd: plugin 'mypkg.losses' (entry point 'mypkg' of mypkg 0.1): loss "
            "'charbonnier' is already registered (by lossd_example_plugin.losses (entry point "
            "'example' of lossd-example-plugin 0.1.0)) and mypkg.losses (entry point 'mypkg' of "
            "mypkg 0.1) registers it again: " + CLASH_FIX) in proc.stderr, proc.stderr


def test_worker_processes_refuse_to_start_too(tmp_path: Path) -> None:
    """With worker processes each worker loads the plugins; one that cannot is a
    configuration error for the whole server."""
    (tmp_path / "testplugin_bad.py").write_text("import testplugin_absent_dependency")
    proc = _serve(tmp_path, "--processes", "2", "--plugin", "testplugin_bad", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert ("plugin 'testplugin_bad' (--plugin): cannot import 'testplugin_bad': "
            "ModuleNotFoundError") in proc.stderr, proc.stderr


def _wait_serving(proc: subprocess.Popen[str], port: int, timeout: float = 120) -> None:
    import time

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"lossd serve exited: {proc.stderr.read() if proc.stderr else ''}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.25)
    pytest.fail("lossd serve not SERVING in time")


def test_every_worker_process_serves_the_plugin(tmp_path: Path) -> None:
    """lossd serve --processes 2 --plugin MOD: both workers (told apart by the loss, which
    adds the worker's index) serve the plugin's loss."""
    import socket

    write_module(tmp_path, "testplugin_workers", """
        import os
        from lossd_server.plugins import register
        register("testplugin_which_worker",
                 lambda x, t: (x - t).abs() + float(os.environ["LOSSD_WORKER_INDEX"]),
                 options={}, targets="values")
    """)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "LOSSD_METRICS_PORT": "-1",
           "LOSSD_DEVICE": "cpu", "LOSSD_PLUGINS": "testplugin_workers"}
    proc = subprocess.Popen([sys.executable, "-m", "lossd_server.serve", "--processes", "2",
                             "--port", str(port), "--grace-seconds", "1"], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_serving(proc, port)  # SERVING only once every worker is ready
        seen: set[float] = set()
        x, t = np.zeros((2, 1), np.float32), np.zeros((2, 1), np.float32)
        for _ in range(200):  # each client its own connection: the kernel spreads them
            with LossClient(f"127.0.0.1:{port}", timeout=10) as c:
                seen.add(float(c.evaluate(x, t, loss="testplugin_which_worker").mean))
            if seen == {0.0, 1.0}:
                break
        assert seen == {0.0, 1.0}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_settings_read_plugins_from_flags_and_the_environment() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    env = {"LOSSD_PLUGINS": " a.losses, b.losses:setup ,", "LOSSD_ENTRY_POINTS": "false"}
    from_env = from_args(parser.parse_args([]), env)
    assert from_env.plugins == ("a.losses", "b.losses:setup")
    assert from_env.entry_points is False
    flags = from_args(parser.parse_args(["--plugin", "c", "--plugin", "d", "--entry-points"]),
                      env)
    assert (flags.plugins, flags.entry_points) == (("c", "d"), True)
    assert Settings().plugins == () and Settings().entry_points is True
    # How worker processes get their settings: LOSSD_* variables, read back the same.
    settings = Settings(plugins=("a.losses", "b:setup"), entry_points=False)
    assert Settings.from_env(settings.to_env()) == settings
    assert Settings.from_env(Settings().to_env()) == Settings()


# ---------------------------------------------------------------------------------------
# Evaluation failures: INTERNAL naming the loss, the traceback in the log, serving goes on

FAULTY = '''
import numpy as np
import torch
from lossd_server.plugins import register

CALLS = []

def raises(input, target):
    raise ZeroDivisionError("the plugin's own words 1234")

def scalar(input, target):
    return (input - target).abs().mean()

def transposed(input, target):
    return (input - target).abs().t().contiguous()

def float16(input, target):
    return (input - target).abs().half()

def not_a_tensor(input, target):
    return [1.0, 2.0]

def elsewhere(input, target):
    return torch.empty(input.shape, dtype=input.dtype, device="meta")

def in_place(input, target):
    return input.sub_(target).abs_()

def numpy_detour(input, target):
    return torch.from_numpy(np.abs(input.detach().numpy() - target.detach().numpy()))

def counted(input, target, *, eps):
    CALLS.append(eps)
    return (input - target).abs() + eps

for fn in (raises, scalar, transposed, float16, not_a_tensor, elsewhere, in_place,
           numpy_detour):
    register("testplugin_" + fn.__name__, fn, options={}, targets="values")
register("testplugin_counted", counted, options={"eps": 0.5}, targets="values")
'''


@pytest.fixture(scope="module")
def faulty_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LossdServer]:
    directory = tmp_path_factory.mktemp("plugins")
    write_module(directory, "testplugin_faulty", FAULTY)
    sys.path.insert(0, str(directory))
    try:
        with restored_registry():
            srv = start_server(plugins=("testplugin_faulty",), metrics_port=0)
            try:
                yield srv
            finally:
                srv.stop(0)
    finally:
        sys.path.remove(str(directory))


@pytest.fixture(scope="module")
def faulty(faulty_server: LossdServer) -> Iterator[LossClient]:
    yield from connected(faulty_server, timeout=30)


X = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
T = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("loss", "problem"), [
    ("raises", "its function raised ZeroDivisionError (the traceback is in the server log)"),
    ("scalar", "its function returned shape (); expected (N, ...) with N = 4"),
    ("transposed", "its function returned shape (3, 4); expected (N, ...) with N = 4"),
    ("float16", "its function returned float16 values; expected float32"),
    ("not_a_tensor", "its function returned a list, not a tensor"),
    ("elsewhere", "its function returned a tensor on meta; expected cpu"),
    ("in_place", "its function modified its arguments in place"),
])
def test_a_failing_plugin_is_internal_naming_the_loss(
        faulty_server: LossdServer, faulty: LossClient, caplog: pytest.LogCaptureFixture,
        loss: str, problem: str) -> None:
    name = f"testplugin_{loss}"
    with caplog.at_level(logging.ERROR, logger="lossd.engine"), \
            pytest.raises(lossd.InternalError) as info:
        faulty.evaluate(X.clone(), T, loss=name)
    assert info.value.code == grpc.StatusCode.INTERNAL
    assert info.value.message.startswith(f"loss {name!r}: {problem}"), info.value.message
    assert "own words" not in info.value.message
    records = [r for r in caplog.records if getattr(r, "loss", None) == name]
    assert records, caplog.text
    if loss == "raises":
        assert records[0].exc_info is not None
        assert "the plugin's own words 1234" in caplog.text  # the traceback, in the log only
    ok = faulty.evaluate(X, T, loss="testplugin_counted")
    torch.testing.assert_close(torch.from_numpy(ok.per_sample), ((X - T).abs() + 0.5).mean(1))
    assert faulty_server.metrics_port
    assert metric_value(faulty_server.metrics_port, "lossd_requests_total", method="Evaluate",
                        loss=name, code="INTERNAL") >= 1


def test_no_gradient_through_a_detour_outside_torch(faulty: LossClient) -> None:
    r = faulty.evaluate(X, T, loss="testplugin_numpy_detour")  # fine without a gradient
    torch.testing.assert_close(torch.from_numpy(r.per_sample), (X - T).abs().mean(1))
    with pytest.raises(lossd.InternalError) as info:
        faulty.evaluate(X, T, loss="testplugin_numpy_detour", gradient="mean")
    assert info.value.message == ("loss 'testplugin_numpy_detour': its output does not depend "
                                  "on the predictions through torch autograd, so no gradient "
                                  "can be computed")


def test_options_are_type_checked_before_the_plugin_runs(faulty: LossClient) -> None:
    calls: list[float] = sys.modules["testplugin_faulty"].CALLS
    before = len(calls)
    for value, problem in (("0.1", "expected float, got str"), (True, "expected float, got bool"),
                           ([0.1], "expected float, got tensor"), (float("nan"), "finite")):
        with pytest.raises(lossd.InvalidArgument) as info:
            faulty.evaluate(X, T, loss="testplugin_counted", eps=value)
        assert info.value.message.startswith("options.eps: ") and problem in info.value.message
    with pytest.raises(lossd.InvalidArgument, match="unknown option"):
        faulty.evaluate(X, T, loss="testplugin_counted", beta=1.0)
    assert len(calls) == before  # the function never saw a bad value
    faulty.evaluate(X, T, loss="testplugin_counted", eps=2)  # an int where a float goes
    assert calls[-1] == 2.0 and isinstance(calls[-1], float)


# ---------------------------------------------------------------------------------------
# A plugin loss gets everything a built-in gets (the example plugin, via its entry point)


@pytest.fixture(scope="module")
def plugin_server(example_plugin: Path) -> Iterator[LossdServer]:
    """A server serving the example plugin, loaded through its entry point."""
    yield from served()


@pytest.fixture(scope="module")
def plugin_client(plugin_server: LossdServer) -> Iterator[LossClient]:
    yield from connected(plugin_server)


def distillation(x: Tensor, t: Tensor, teacher: Tensor, temperature: float = 2.0,
                 alpha: float = 0.5) -> Tensor:
    """Per-position reference, written out with torch.nn.functional."""
    kl = F.kl_div(F.log_softmax(x / temperature, 1), F.softmax(teacher / temperature, 1),
                  reduction="none").sum(1)
    return alpha * temperature ** 2 * kl + (1 - alpha) * F.cross_entropy(x, t, reduction="none")


def batch(n: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x, teacher = torch.randn(n, 6, generator=g), torch.randn(n, 6, generator=g)
    t = torch.randint(0, 6, (n,), generator=g)
    return x, t, teacher, torch.rand(n, generator=g)


def test_a_server_serves_the_installed_plugin(plugin_client: LossClient) -> None:
    infos = {i.name: i for i in plugin_client.losses()}
    assert infos["charbonnier"].source != "lossd"
    assert infos["cross_entropy"].source == "lossd"
    x, t, teacher, w = batch(50, 0)
    r = plugin_client.evaluate(x, t, loss="knowledge_distillation",
                               inputs={"teacher": teacher}, weights=w)
    want = distillation(x, t, teacher)
    torch.testing.assert_close(torch.from_numpy(r.per_sample), want, rtol=1e-5, atol=1e-6)
    assert r.count == 50 and r.weight_sum == pytest.approx(float(w.double().sum()))


def test_plugin_streams_splits_and_nan_policy(plugin_server: LossdServer,
                                              plugin_client: LossClient) -> None:
    x, t, teacher, w = batch(3000, 1)
    x[7, 2] = float("nan")
    inputs = {"teacher": teacher}
    unary = plugin_client.evaluate(x, t, loss="knowledge_distillation", inputs=inputs,
                                   weights=w, nan_policy="omit")
    assert unary.omitted == 1 and unary.count == 2999 and np.isnan(unary.per_sample[7])
    with LossClient(f"127.0.0.1:{plugin_server.port}", max_message_bytes=100_000) as small:
        split = small.evaluate(x, t, loss="knowledge_distillation", inputs=inputs, weights=w,
                               nan_policy="omit")
    assert np.array_equal(split.per_sample, unary.per_sample, equal_nan=True)
    assert split.aggregates == unary.aggregates
    parts = [(x[i:i + 700], t[i:i + 700], w[i:i + 700], {"teacher": teacher[i:i + 700]})
             for i in range(0, 3000, 700)]
    results = list(plugin_client.evaluate_stream(parts, loss="knowledge_distillation",
                                                 nan_policy="omit"))
    assert len(results) == 5 and results[-1].running == unary.aggregates


def test_plugin_gradient_equals_local_autograd(plugin_client: LossClient) -> None:
    x, t, teacher, w = batch(9, 2)
    r = plugin_client.evaluate(x, t, loss="knowledge_distillation",
                               inputs={"teacher": teacher}, weights=w,
                               gradient="weighted_mean", temperature=3.0)
    leaf = x.clone().requires_grad_(True)
    per = distillation(leaf, t, teacher, temperature=3.0)
    ((w * per).sum() / w.sum()).backward()
    assert r.gradient is not None
    torch.testing.assert_close(torch.from_numpy(r.gradient), leaf.grad, rtol=1e-5, atol=1e-6)


def test_plugin_through_shared_memory(plugin_client: LossClient) -> None:
    x, t, teacher, w = batch(200, 3)
    socket = plugin_client.evaluate(x, t, loss="knowledge_distillation",
                                    inputs={"teacher": teacher}, weights=w)
    with plugin_client.shared_memory(1 << 20) as shm:
        shared = shm.evaluate(x, t, loss="knowledge_distillation", inputs={"teacher": teacher},
                              weights=w)
    assert np.array_equal(shared.per_sample, socket.per_sample)
    assert shared.aggregates == socket.aggregates


def test_plugin_and_extra_inputs_on_the_open_inference_protocol(
        plugin_server: LossdServer, plugin_client: LossClient) -> None:
    x, t, teacher, _ = batch(5, 4)
    with grpc.insecure_channel(f"127.0.0.1:{plugin_server.port}") as channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        meta = stub.ModelMetadata(kpb.ModelMetadataRequest(name="knowledge_distillation"),
                                  timeout=30)
        assert [(i.name, i.datatype) for i in meta.inputs] == [
            ("PREDICTIONS", "FP32"), ("TARGETS", "INT64"), ("WEIGHTS", "FP32"),
            ("SAMPLE_IDS", "INT64"), ("TEACHER", "FP32")]
        req = kpb.ModelInferRequest(model_name="knowledge_distillation")
        for name, arr, datatype in (("PREDICTIONS", x, "FP32"), ("TARGETS", t, "INT64"),
                                    ("TEACHER", teacher, "FP32")):
            req.inputs.add(name=name, datatype=datatype, shape=arr.shape)
            req.raw_input_contents.append(arr.numpy().tobytes())
        req.parameters["alpha"].double_param = 0.25
        resp = stub.ModelInfer(req, timeout=30)
        native = plugin_client.evaluate(x, t, loss="knowledge_distillation",
                                        inputs={"teacher": teacher}, alpha=0.25)
        assert resp.outputs[0].name == "PER_SAMPLE"
        assert resp.raw_output_contents[0] == native.per_sample.tobytes()
        del req.inputs[2], req.raw_input_contents[2]
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(req, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("TEACHER: missing"), err.value.details()


def test_plugin_losses_are_metric_labels(example_plugin: Path) -> None:
    srv = start_server(metrics_port=0)
    try:
        with LossClient(f"127.0.0.1:{srv.port}") as c:
            c.evaluate(X, T, loss="charbonnier")
            with pytest.raises(lossd.InvalidArgument):
                c.evaluate(X, T, loss="no_such_plugin_loss")
        assert srv.metrics_port
        port = srv.metrics_port
        assert metric_value(port, "lossd_requests_total", method="Evaluate", loss="charbonnier",
                            code="OK") == 1
        assert metric_value(port, "lossd_samples_total", loss="charbonnier") == 4
        assert metric_value(port, "lossd_requests_total", method="Evaluate", loss="invalid",
                            code="INVALID_ARGUMENT") == 1
        # A plugin loss in use starts its other codes at zero like a built-in; one nobody
        # used has no series, like a built-in.
        assert metric_value(port, "lossd_requests_total", method="Evaluate", loss="charbonnier",
                            code="INTERNAL") == 0
        with pytest.raises(KeyError):
            metric_value(port, "lossd_requests_total", method="Evaluate",
                         loss="knowledge_distillation", code="OK")
    finally:
        srv.stop(0)


def test_lossd_losses_lists_plugins_inputs_and_targets(plugin_server: LossdServer,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    from lossd._cli import main

    assert main(["losses", "--target", f"127.0.0.1:{plugin_server.port}"]) == 0
    out = capsys.readouterr().out
    assert "knowledge_distillation: Knowledge distillation" in out and "[plugin: " in out
    assert "    input teacher: same as predictions (float)" in out
    assert "targets (classes)" in out
    assert "triplet_margin_loss:" in out and "no targets" in out
    assert "    input input_lengths: (N) (int)" in out


# ---------------------------------------------------------------------------------------
# The analyses (per class, accuracy, hardest) on the new losses and on a plugin


def test_analyses_follow_the_kind_of_targets(plugin_client: LossClient) -> None:
    """Class-index analyses apply to every loss with class-index targets (a plugin's and
    multi_margin_loss, whose ignore_index is lossd's), not to label sequences; hardest and
    quantiles apply to every loss, one without targets too."""
    x, t, teacher, _ = batch(40, 6)
    t[::4] = -100
    r = plugin_client.evaluate(x, t, loss="multi_margin_loss", per_class=True, accuracy=True)
    kept = t != -100
    assert r.ignored == 10 and r.per_class is not None
    assert sorted(r.per_class) == sorted(set(t[kept].tolist()))
    assert sum(r.per_class[c].count for c in r.per_class) == 30
    hits = (x.argmax(1) == t)[kept].double().mean().item()
    assert r.accuracy == pytest.approx(hits)
    kd = plugin_client.evaluate(x, t.clamp(min=0), loss="knowledge_distillation",
                                inputs={"teacher": teacher}, per_class=True, hardest=3)
    assert kd.per_class is not None and kd.hardest is not None
    assert [s.loss for s in kd.hardest.samples] == sorted(kd.per_sample.tolist(),
                                                          reverse=True)[:3]
    anchors = plugin_client.evaluate(x, loss="triplet_margin_loss", hardest=2, quantiles=True,
                                     inputs={"positive": teacher, "negative": x.flip(0)})
    assert anchors.hardest is not None and len(anchors.hardest.samples) == 2
    with pytest.raises(lossd.InvalidArgument) as info:
        plugin_client.evaluate(x, loss="triplet_margin_loss", accuracy=True,
                               inputs={"positive": teacher, "negative": x})
    assert info.value.message.startswith("accuracy: needs class-index targets; "
                                         "triplet_margin_loss takes none")
    log_probs = torch.randn(2, 5, 4).log_softmax(2)
    with pytest.raises(lossd.InvalidArgument) as info:
        plugin_client.evaluate(log_probs, torch.tensor([[1, 2], [3, 1]]), loss="ctc_loss",
                               per_class=True, inputs={"input_lengths": [5, 5],
                                                       "target_lengths": [2, 2]})
    assert info.value.message.startswith("per_class: needs class-index targets; ctc_loss "
                                         "takes label sequences")
