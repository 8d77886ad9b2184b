"""deploy/kubernetes: schemas, kustomization wiring and cross-file consistency, offline.

- Built-in kinds (Deployment, Service, the generated ConfigMaps) against the Kubernetes OpenAPI
  schemas shipped by `kubernetes-validate`, strictly (unknown fields fail).
- PodMonitor / PrometheusRule (Prometheus Operator CRDs, not in those schemas): checked
  structurally against the fields we use (a JSON-schema subset of the CRDs written here), the
  rules' PromQL by `promtool check rules`, and the rules equal deploy/prometheus/alerts.yml.
- The kustomization renders (by a small renderer for the features it uses, and by
  `kubectl kustomize` when kubectl is installed) and every name and port lines up with the Envoy
  and sidecar configs.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from extproc.core import config as config_mod
from extproc.devtools import envoy_config
from tests.support import load_script

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "kubernetes"
K8S_VERSION = "1.30.0"  # oldest version we support: native grpc probes (1.27) and preStop sleep (1.30)


def _kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def _render() -> list[dict[str, Any]]:
    """The subset of kustomize this directory uses: resources + configMapGenerator (unhashed)."""
    k = _kustomization()
    docs: list[dict[str, Any]] = []
    for res in k["resources"]:
        path = K8S / res
        assert path.is_file(), f"kustomization resource {res} missing"
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for gen in k["configMapGenerator"]:
        data = {}
        for entry in gen["files"]:
            key, _, src = entry.partition("=") if "=" in entry else (Path(entry).name, "", entry)
            path = K8S / src
            assert path.is_file(), f"configMapGenerator {gen['name']}: {src} missing"
            data[key] = path.read_text()
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    return docs


@pytest.fixture(scope="module")
def docs() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in _render()} | {f"ConfigMap/{d['metadata']['name']}": d for d in _render() if d["kind"] == "ConfigMap"}


def _pod(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return docs["Deployment"]["spec"]["template"]["spec"]


def _container(docs: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    return next(c for c in _pod(docs)["containers"] if c["name"] == name)


def _ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


@pytest.mark.parametrize("kind", ["Deployment", "Service", "ConfigMap/envoy-config", "ConfigMap/extproc-config"])
def test_builtin_kinds_validate(docs, kind):
    kubernetes_validate.validate(docs[kind], K8S_VERSION, strict=True)


def test_validator_is_strict(docs):
    import copy

    bad = copy.deepcopy(docs["Deployment"])
    bad["spec"]["template"]["spec"]["containers"][1]["readinessProbe"]["grcp"] = {"port": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


# The Prometheus Operator CRD fields we use (monitoring.coreos.com/v1), closed to unknown keys.
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
}
_METADATA = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
PODMONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["selector", "podMetricsEndpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": _LABEL_SELECTOR,
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        },
                    },
                },
            },
        },
    },
}
PROMETHEUSRULE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["groups"],
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string"},
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["alert", "expr"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "alert": {"type": "string"},
                                        "expr": {"type": "string"},
                                        "for": {"type": "string"},
                                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                                    },
                                },
                            },
                        },
                    },
                }
            },
        },
    },
}


def test_podmonitor(docs):
    pm = docs["PodMonitor"]
    jsonschema.validate(pm, PODMONITOR)
    pod_labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    named = _ports(_container(docs, "extproc")) | _ports(_container(docs, "envoy"))
    scraped = {e["port"]: e["path"] for e in pm["spec"]["podMetricsEndpoints"]}
    assert scraped == {"metrics": "/metrics", "ops": "/stats/prometheus"}
    assert set(scraped) <= set(named)


def test_prometheusrule_is_the_alert_file(docs):
    pr = docs["PrometheusRule"]
    jsonschema.validate(pr, PROMETHEUSRULE)
    alerts = yaml.safe_load((REPO / "deploy/prometheus/alerts.yml").read_text())
    assert pr["spec"]["groups"] == alerts["groups"], "run `make deploy-rules`"
    render_rules = load_script(REPO / "deploy" / "render_rules.py")
    assert (K8S / "prometheusrule.yaml").read_text() == render_rules.render()


def test_prometheusrule_promql_checks(tmp_path, docs):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    f = tmp_path / "rules.yml"
    f.write_text(yaml.safe_dump({"groups": docs["PrometheusRule"]["spec"]["groups"]}))
    p = subprocess.run([promtool, "check", "rules", str(f)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_configmaps_and_mounts_line_up(docs):
    pod = _pod(docs)
    volumes = {v["name"]: v for v in pod["volumes"]}
    generated = {g["name"] for g in _kustomization()["configMapGenerator"]}
    for v in volumes.values():
        if "configMap" in v:
            assert v["configMap"]["name"] in generated
    for c in pod["containers"]:
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, f"{c['name']}: mount of unknown volume {m['name']}"
    # The files the containers are told to read are the ConfigMap keys at the mount paths.
    envoy = _container(docs, "envoy")
    cfg_path = envoy["args"][envoy["args"].index("-c") + 1]
    mount = next(m for m in envoy["volumeMounts"] if cfg_path.startswith(m["mountPath"] + "/"))
    cm = docs[f"ConfigMap/{volumes[mount['name']]['configMap']['name']}"]
    assert cfg_path[len(mount["mountPath"]) + 1 :] in cm["data"]
    ext = _container(docs, "extproc")
    cfg_path = ext["args"][ext["args"].index("--config") + 1]
    mount = next(m for m in ext["volumeMounts"] if cfg_path.startswith(m["mountPath"] + "/"))
    cm = docs[f"ConfigMap/{volumes[mount['name']]['configMap']['name']}"]
    assert cfg_path[len(mount["mountPath"]) + 1 :] in cm["data"]


def test_ports_and_addresses_agree(docs):
    envoy_cfg = yaml.safe_load(docs["ConfigMap/envoy-config"]["data"]["envoy.yaml"])
    assert docs["ConfigMap/envoy-config"]["data"]["envoy.yaml"] == envoy_config.render("kubernetes"), "run `make envoy-config`"
    sidecar = config_mod.parse(yaml.safe_load(docs["ConfigMap/extproc-config"]["data"]["config.yaml"]), "extproc-config")
    listeners = {l["name"]: l["address"]["socket_address"] for l in envoy_cfg["static_resources"]["listeners"]}
    clusters = {c["name"]: c for c in envoy_cfg["static_resources"]["clusters"]}
    envoy_ports, ext_ports = _ports(_container(docs, "envoy")), _ports(_container(docs, "extproc"))
    assert listeners["llm"]["port_value"] == envoy_ports["http"]
    assert listeners["ops"]["port_value"] == envoy_ports["ops"]
    assert envoy_cfg["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"  # admin not on the pod IP
    # Envoy -> sidecar over the pod's loopback.
    sa = clusters["ext_proc"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert f"{sa['address']}:{sa['port_value']}" == sidecar.listen and sidecar.listen.startswith("127.0.0.1:")
    # The kubelet's grpc probes reach the health-only address; Prometheus the stats port.
    assert sidecar.health_listen is not None
    health_port = int(sidecar.health_listen.rpartition(":")[2])
    assert ext_ports["health"] == health_port and sidecar.health_listen.startswith("0.0.0.0:")
    ext = _container(docs, "extproc")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert ext[probe]["grpc"]["port"] == health_port
    assert ext_ports["metrics"] == sidecar.stats.port
    # /metrics binds loopback by default; the PodMonitor scrapes the pod IP, so the ConfigMap says so.
    assert sidecar.stats.address == "0.0.0.0" != config_mod.StatsConfig().address
    envoy = _container(docs, "envoy")
    assert envoy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "ops"}
    # Service -> Envoy's listener.
    svc = docs["Service"]
    assert svc["spec"]["selector"].items() <= docs["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(envoy_ports)
    # Shutdown budget: preStop sleep + the sidecar's drain fit in the termination grace period.
    pre_stop = max(c["lifecycle"]["preStop"]["sleep"]["seconds"] for c in _pod(docs)["containers"])
    assert _pod(docs)["terminationGracePeriodSeconds"] > pre_stop + sidecar.shutdown_grace_seconds


def test_security_and_resources(docs):
    pod = _pod(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["runAsUser"] != 0 and sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and {"cpu", "memory"} <= set(c["resources"]["limits"])
        image = c["image"]
        if c["name"] == "extproc":  # the kustomize images: entry pins it
            image = next(f"{i['newName']}:{i['newTag']}" for i in _kustomization()["images"] if i["name"] == image)
        assert image.rpartition(":")[2] not in ("", "latest")


def test_kubectl_kustomize_agrees(docs):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed; the built-in renderer above covers the same resources")
    p = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    rendered = [d for d in yaml.safe_load_all(p.stdout) if d]
    assert sorted(d["kind"] for d in rendered) == sorted(d["kind"] for d in _render())
    names = {d["metadata"]["name"] for d in rendered if d["kind"] == "ConfigMap"}
    pod = next(d for d in rendered if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    for v in pod["volumes"]:
        if "configMap" in v:
            assert v["configMap"]["name"] in names  # hashed names rewritten consistently
    for d in rendered:
        if d["kind"] in ("Deployment", "Service", "ConfigMap"):
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    assert {c["image"] for c in pod["containers"]} == {"envoyproxy/envoy:v1.40.0", "envoy-ai-extproc:0.1.0"}
