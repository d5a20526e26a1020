"""The deploy/ files stay true: Dockerfile lint, Kubernetes schemas, alert rules and their unit
tests, the dashboard's metric names, and a real Prometheus scraping a running sidecar."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from sidecar.config.models import Config
from sidecar.metrics import Metrics
from tests.conftest import MakeSidecar, admin_url
from tests.helpers import eventually, free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
PROM = DEPLOY / "prometheus"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """A tool's path; outside CI a missing tool skips (saying why), in CI it fails."""
    found = shutil.which(name) or shutil.which(name, path=str(BIN))
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing in CI: `make test` installs it")
        pytest.skip(f"{name} is not installed here (make test installs it)")
    return found


def run(*argv: str, cwd: Path | None = None) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, check=False)  # noqa: S603
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_dockerfile_passes_hadolint() -> None:
    """The image definition lints clean, runs as a fixed non-root UID and checks /healthz."""
    run(tool("hadolint"), str(DEPLOY / "Dockerfile"))
    text = (DEPLOY / "Dockerfile").read_text()
    assert "USER 10001:10001" in text
    assert "HEALTHCHECK" in text
    assert 'ENTRYPOINT ["sidecar", "run"]' in text


def test_image_labels_carry_the_one_version() -> None:
    """The image's OCI labels take the version, commit and time from build arguments, and
    ``make image`` passes the version the package is installed as (sidecar/__init__.py, which
    pyproject.toml reads) and tags the image with it."""
    from importlib.metadata import version

    text = (DEPLOY / "Dockerfile").read_text()
    for label, arg in (("version", "VERSION"), ("revision", "REVISION"), ("created", "CREATED")):
        assert f"ARG {arg}" in text
        assert f'org.opencontainers.image.{label}="${{{arg}}}"' in text
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in text
    dry = run("make", "--no-print-directory", "-n", "image", cwd=ROOT)
    assert f"--build-arg VERSION={version('sidecar')} " in dry, dry
    assert f"-t sidecar:{version('sidecar')} " in dry, dry


OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
COMPONENT = K8S / "components" / "sidecar"
#: operator resources: kubernetes-validate bundles no schema for CRDs
CRD_KINDS = {"PodMonitor", "ServiceMonitor", "PrometheusRule"}
#: the oldest Kubernetes with native sidecars on by default (init containers with restartPolicy)
OLDEST_KUBERNETES = (1, 29)


def kubernetes_versions() -> list[str]:
    """Every Kubernetes version kubernetes-validate has schemas for, from 1.29 to its newest."""
    from kubernetes_validate import utils

    found = {tuple(int(n) for n in v.split(".")[:2]) for v in utils.all_versions()}
    return [f"{major}.{minor}.0" for major, minor in sorted(found) if (major, minor) >= (1, 29)]


def kustomize(overlay: Path) -> list[dict[str, Any]]:
    """What ``kubectl kustomize`` renders for a kustomization directory, as documents."""
    out = subprocess.run(  # noqa: S603
        [tool("kubectl"), "kustomize", str(overlay)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def assert_valid_for_every_kubernetes(rendered: list[dict[str, Any]]) -> None:
    """Every rendered resource but the operator's CRDs validates strictly (unknown fields are
    errors) against the schemas of every Kubernetes from 1.29 to the newest known."""
    from kubernetes_validate import utils

    versions = kubernetes_versions()
    assert versions[0] == "1.29.0"
    assert len(versions) >= 2, versions
    checked = [d for d in rendered if d["kind"] not in CRD_KINDS]
    assert checked
    for version in versions:
        for doc in checked:
            try:
                utils.validate(doc, version, strict=True)
            except utils.ValidationError as exc:
                pytest.fail(f"{doc['kind']} {doc['metadata']['name']} on {version}: {exc}")


def attach(tmp_path: Path, workloads: str, config: str = "listen: {port: 8080}\n") -> Path:
    """A kustomization of the user's own, holding ``workloads`` and the Component."""
    (tmp_path / "workloads.yaml").write_text(workloads)
    (tmp_path / "config.yaml").write_text(config)
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": ["workloads.yaml"],
                "components": [os.path.relpath(COMPONENT, tmp_path)],
                "configMapGenerator": [{"name": "sidecar-config", "files": ["config.yaml"]}],
            }
        )
    )
    return tmp_path


#: two workloads of someone else's, nothing alike: kinds, names, labels, selectors, volumes
USER_WORKLOADS = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: checkout, labels: {team: shop}}
spec:
  selector: {matchLabels: {run: checkout-web}}
  template:
    metadata: {labels: {run: checkout-web, tier: front}}
    spec:
      containers:
        - {name: web, image: "shop/checkout:7", ports: [{name: http, containerPort: 8000}]}
      volumes:
        - {name: cache, emptyDir: {}}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: ledger, labels: {app.kubernetes.io/name: ledger}}
spec:
  serviceName: ledger
  replicas: 3
  selector: {matchLabels: {app.kubernetes.io/name: ledger}}
  template:
    metadata: {labels: {app.kubernetes.io/name: ledger}}
    spec:
      initContainers:
        - {name: migrate, image: "bank/ledger:2", command: [ledger, migrate]}
      containers:
        - {name: ledger, image: "bank/ledger:2"}
  volumeClaimTemplates:
    - metadata: {name: data}
      spec:
        accessModes: [ReadWriteOnce]
        resources: {requests: {storage: 1Gi}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: batch, annotations: {sidecar/attach: "false"}}
spec:
  selector: {matchLabels: {job: batch}}
  template:
    metadata: {labels: {job: batch}}
    spec:
      containers: [{name: batch, image: "ops/batch:1"}]
"""


def pod_of(doc: dict[str, Any]) -> dict[str, Any]:
    return dict(doc["spec"]["template"]["spec"])


def sidecar_of(pod: dict[str, Any]) -> dict[str, Any]:
    (sidecar,) = [c for c in pod.get("initContainers", []) if c["name"] == "sidecar"]
    return dict(sidecar)


def test_the_component_attaches_to_any_deployment_or_statefulset(tmp_path: Path) -> None:
    """The Component, added to a kustomization of someone else's workloads (a Deployment and a
    StatefulSet with different names, labels and selectors), gives each a native sidecar with
    its volumes, keeps every one of their own containers, volumes, labels and selectors, adds
    one label the PodMonitor selects by and no app label of ours, leaves a workload annotated
    ``sidecar/attach: "false"`` alone, and the result is valid on Kubernetes 1.29 to the newest."""
    original = {d["metadata"]["name"]: d for d in yaml.safe_load_all(USER_WORKLOADS)}
    rendered = kustomize(attach(tmp_path, USER_WORKLOADS))
    by_name = {d["metadata"]["name"]: d for d in rendered}
    for name in ("checkout", "ledger"):
        before, after = original[name], by_name[name]
        assert after["metadata"] == before["metadata"]
        assert after["spec"]["selector"] == before["spec"]["selector"]
        labels = dict(after["spec"]["template"]["metadata"]["labels"])
        assert labels.pop("sidecar/attached") == "true"
        assert labels == before["spec"]["template"]["metadata"]["labels"]
        pod, was = pod_of(after), pod_of(before)
        assert pod["containers"] == was["containers"]
        assert [c for c in pod.get("initContainers", []) if c["name"] != "sidecar"] == was.get(
            "initContainers", []
        )
        volumes = {v["name"] for v in pod["volumes"]}
        assert {v["name"] for v in was.get("volumes", [])} <= volumes
        sidecar = sidecar_of(pod)
        assert {m["name"] for m in sidecar["volumeMounts"]} <= volumes
        config = next(v for v in pod["volumes"] if v["name"] == "sidecar-config")
        assert config["configMap"]["name"] == by_name_kind(rendered, "ConfigMap")
    assert by_name["batch"] == original["batch"]
    (monitor,) = [d for d in rendered if d["kind"] == "PodMonitor"]
    assert monitor["spec"]["selector"] == {"matchLabels": {"sidecar/attached": "true"}}
    assert_valid_for_every_kubernetes(rendered)


def by_name_kind(rendered: list[dict[str, Any]], kind: str) -> str:
    (name,) = [d["metadata"]["name"] for d in rendered if d["kind"] == kind]
    return str(name)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_each_overlay_is_valid_for_every_kubernetes(overlay: Path) -> None:
    """Each shipped overlay renders with kustomize and every resource other than the operator's
    CRDs validates strictly against the schemas of Kubernetes 1.29 to the newest."""
    rendered = kustomize(overlay)
    assert {"Deployment", "ConfigMap", "PodMonitor"} <= {d["kind"] for d in rendered}
    assert_valid_for_every_kubernetes(rendered)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_rendered_pod_finds_its_config_and_secrets(overlay: Path) -> None:
    """In each rendered overlay the pod's ConfigMap volumes and its required Secret volumes name
    resources that exist, the sidecar config inside passes sidecar's own validation, and every
    secret file it reads lies under a mounted Secret that has that key, or a projected
    service-account token."""
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for doc in kustomize(overlay):
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    (deployment,) = by_kind["Deployment"].values()
    pod = pod_of(deployment)
    sidecar = sidecar_of(pod)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in sidecar["volumeMounts"]}
    for volume in volumes.values():
        if "configMap" in volume:
            assert volume["configMap"]["name"] in by_kind["ConfigMap"], volume
        if "secret" in volume and not volume["secret"].get("optional"):
            assert volume["secret"]["secretName"] in by_kind.get("Secret", {}), volume
    config_map = by_kind["ConfigMap"][mounts["/etc/sidecar"]["configMap"]["name"]]
    config = Config.model_validate(yaml.safe_load(config_map["data"]["config.yaml"]))
    identity = config.identity
    secret_files = [
        getattr(identity, "client_secret_file", None),
        getattr(identity, "password_file", None),
        getattr(identity, "private_key_file", None),
        getattr(identity, "assertion_file", None),
        getattr(identity, "subject_token_file", None),
        getattr(identity, "actor_token_file", None),
        getattr(identity, "client_assertion_file", None),
        *getattr(identity, "previous_client_secret_files", ()),
        *getattr(identity, "previous_private_key_files", ()),
        config.session.encryption_key_file,
        config.session.redis_url_file,
    ]
    for path in filter(None, secret_files):
        volume = mounts[str(path.parent)]
        if "projected" in volume:
            tokens = [s.get("serviceAccountToken", {}) for s in volume["projected"]["sources"]]
            assert path.name in [t.get("path") for t in tokens], (path, volume)
            continue
        secret = by_kind["Secret"][volume["secret"]["secretName"]]
        keys = set(secret.get("data", {})) | set(secret.get("stringData", {}))
        assert path.name in keys, (path, keys)


def test_the_token_exchange_overlay_creates_no_secret() -> None:
    """The token-exchange overlay promises no stored secret: it renders no Secret at all, and
    the pod still starts (the credentials volume is optional)."""
    rendered = kustomize(K8S / "overlays" / "token-exchange")
    assert "Secret" not in {d["kind"] for d in rendered}
    (deployment,) = [d for d in rendered if d["kind"] == "Deployment"]
    for volume in pod_of(deployment)["volumes"]:
        if "secret" in volume:
            assert volume["secret"]["optional"] is True, volume


def test_the_sidecar_probes_cannot_crash_loop_and_outlast_an_outage() -> None:
    """The native sidecar's startup and liveness probes are /healthz (the process answers), so a
    provider outage at rollout cannot make the kubelet restart it; readiness is
    /readyz?outage=keep-serving, so an outage longer than a token's life does not take every
    replica out of service; the container is locked down (read-only root, no capabilities,
    non-root, RuntimeDefault seccomp) with a memory limit."""
    (patch,) = documents(COMPONENT / "sidecar.yaml")
    sidecar = sidecar_of(pod_of(patch))
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz?outage=keep-serving"
    context = sidecar["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["runAsNonRoot"] is True
    assert context["capabilities"]["drop"] == ["ALL"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["seccompProfile"]["type"] == "RuntimeDefault"
    assert "memory" in sidecar["resources"]["limits"]


def test_every_shipped_image_tag_is_the_version() -> None:
    """The sidecar image the Component and the overlays name carries the one version."""
    from importlib.metadata import version

    (patch,) = documents(COMPONENT / "sidecar.yaml")
    assert sidecar_of(pod_of(patch))["image"].endswith(f":{version('sidecar')}")
    for overlay in OVERLAYS:
        for image in documents(overlay / "kustomization.yaml")[0].get("images", []):
            assert image["newTag"] == version("sidecar"), overlay


@pytest.mark.parametrize(
    "path",
    [
        K8S / "base" / "configmap.yaml",
        K8S / "overlays" / "redis" / "config.yaml",
        K8S / "overlays" / "token-exchange" / "config.yaml",
        K8S / "overlays" / "workload-identity" / "config.yaml",
    ],
)
def test_shipped_sidecar_configs_are_valid(path: Path) -> None:
    """The sidecar configs inside the ConfigMaps pass sidecar's own validation."""
    config_text = documents(path)[0]["data"]["config.yaml"]
    Config.model_validate(yaml.safe_load(config_text))


def test_operator_resources_have_their_required_fields() -> None:
    """PodMonitor and PrometheusRule (CRDs, no bundled schema) carry what the operator needs and
    the same selection labels (an operator that picks one picks the other); the PodMonitor's port
    is the sidecar's; the PrometheusRule holds exactly the rule file's groups."""
    monitor = documents(COMPONENT / "podmonitor.yaml")[0]
    assert monitor["kind"] == "PodMonitor"
    (patch,) = documents(COMPONENT / "sidecar.yaml")
    ports = [p["name"] for p in sidecar_of(pod_of(patch))["ports"]]
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] in ports
    rule = documents(PROM / "prometheusrule.yaml")[0]
    assert rule["kind"] == "PrometheusRule"
    assert rule["metadata"]["labels"] == monitor["metadata"]["labels"]
    assert rule["spec"]["groups"] == documents(PROM / "sidecar-rules.yaml")[0]["groups"]


def test_alert_rules_check_and_pass_their_unit_tests() -> None:
    """promtool check rules and promtool test rules on the shipped alerts."""
    promtool = tool("promtool")
    run(promtool, "check", "rules", "sidecar-rules.yaml", cwd=PROM)
    out = run(promtool, "test", "rules", "sidecar-rules.test.yaml", cwd=PROM)
    assert "SUCCESS" in out


def test_dashboard_and_alerts_use_only_real_metrics() -> None:
    """Every sidecar_* name in the dashboard and the alerts is one sidecar exports, and every
    sidecar_* metric appears on the dashboard (process_* and python_* are the standard ones)."""
    import re

    exported = set()
    for family in Metrics().registry.collect():
        exported.add(family.name)
        exported.update(s.name for s in family.samples)
        if family.type == "counter":
            exported.add(family.name + "_total")  # labelled counters have no samples yet
        if family.type == "histogram":  # nor labelled histograms
            exported.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    dashboard = (PROM / "grafana-dashboard.json").read_text()
    json.loads(dashboard)
    used = set(
        re.findall(r"sidecar_[a-z_]+", dashboard + (PROM / "sidecar-rules.yaml").read_text())
    )
    assert used <= exported, used - exported
    for family in Metrics().registry.collect():
        if family.name.startswith("sidecar_"):
            assert family.name in dashboard, family.name


async def test_live_metrics_pass_promtool_check_metrics(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession
) -> None:
    """What /metrics serves from a running sidecar is valid Prometheus exposition."""
    promtool = tool("promtool")
    sidecar = await make_sidecar()
    await eventually(lambda: sidecar.session.usable() is not None)
    async with http.get(admin_url(sidecar, "/metrics")) as resp:
        text = await resp.text()
    result = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_a_real_prometheus_scrapes_sidecar_session_valid(
    make_sidecar: MakeSidecar, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A Prometheus server on loopback scrapes a running sidecar; the PromQL query
    sidecar_session_valid answers 1."""
    prometheus = tool("prometheus")
    sidecar = await make_sidecar()
    await eventually(lambda: sidecar.session.usable() is not None)
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "sidecar",
                        "static_configs": [{"targets": [f"127.0.0.1:{sidecar.admin_port}"]}],
                    }
                ],
            }
        )
    )
    process = await asyncio.create_subprocess_exec(
        prometheus,
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        query = urllib.parse.urlencode({"query": "sidecar_session_valid"})
        url = f"http://127.0.0.1:{port}/api/v1/query?{query}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        value = None
        while value is None:
            assert loop.time() < deadline, "Prometheus never returned sidecar_session_valid"
            await asyncio.sleep(0.5)
            try:
                async with aiohttp.ClientSession() as plain, plain.get(url) as resp:
                    result = (await resp.json())["data"]["result"]
            except (aiohttp.ClientError, KeyError, ValueError):
                continue
            if result:
                value = result[0]["value"][1]
        assert value == "1"
    finally:
        process.terminate()
        await process.wait()


def test_documented_config_reference_equals_the_model() -> None:
    """docs/config-reference.md is exactly what the config model generates, and every key in it
    has a meaning."""
    from sidecar.config.reference import generate

    committed = (ROOT / "docs" / "config-reference.md").read_text()
    assert committed == generate(), (
        "run: python -m sidecar.config.reference > docs/config-reference.md"
    )
    for line in committed.splitlines():
        if line.startswith("| `") and "| section |" not in line:
            assert not line.rstrip().endswith("|  |"), line


def _requirers(lock: Path) -> dict[str, set[str]]:
    """Each package of a pip-compile lock file and what its ``# via`` lines name."""
    found: dict[str, set[str]] = {}
    current = ""
    for line in lock.read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            current = line.split("==")[0].strip().lower()
            found[current] = set()
        elif line.strip().startswith("#") and current:
            words = line.strip("# ").removeprefix("via").strip()
            if words:
                found[current].add(words.split(" (")[0].lower())
    return found


def test_the_image_leaves_out_exactly_what_only_the_build_needs() -> None:
    """The image's build stage compiles the data path with mypy's mypyc, then uninstalls mypy and
    every package of requirements/run.txt that only mypy needs: a lock refresh that changes those
    makes this test name the difference instead of leaving a compiler in the image (or removing
    what sidecar runs on)."""
    requirers = _requirers(ROOT / "requirements" / "run.txt")
    build_only = {"mypy"}
    grew = True
    while grew:
        more = {p for p, via in requirers.items() if via and via <= build_only} - build_only
        build_only |= more
        grew = bool(more)
    text = (DEPLOY / "Dockerfile").read_text()
    uninstall = text.split("pip uninstall --yes ", 1)[1].split("\\", 1)[0].split()
    assert {name.lower().replace("_", "-") for name in uninstall} == build_only
