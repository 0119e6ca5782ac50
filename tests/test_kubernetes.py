"""deploy/kubernetes/: every manifest valid, the pieces agree with each other and with the service.

Each Kubernetes document is validated, strictly (no unknown field), against the API's JSON schemas
of the oldest and the newest version we support, with the `kubernetes-validate` package (its
schemas ship inside it: no network). KEDA's ScaledObject is not a Kubernetes type: it is checked
against tests/keda_scaledobject.schema.json, the fields of KEDA 2.20's CRD, its HPA behaviour
against Kubernetes' own HorizontalPodAutoscaler schema, and each trigger's metadata against the
names KEDA's redis and prometheus scalers read. The worker's heartbeat probe and drain hook run
against a real Redis, worker and web tier.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import requests
import yaml

from shared.settings import REPO_ROOT, Settings
from shared.tasks import inference_queue, priority_lists
from tests.conftest import ARTIFACTS, write_slow_card
from tools.stack import free_port, start_redis, start_web, start_worker, stop, wait_for

K8S = REPO_ROOT / "deploy" / "kubernetes"
KUSTOMIZATION = K8S / "kustomization.yaml"
KEDA_SCHEMA = json.loads((Path(__file__).parent / "keda_scaledobject.schema.json").read_text())
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())  # oldest we support, newest the package has
# Trigger metadata KEDA's scalers read (pkg/scalers/redis_scaler.go, prometheus_scaler.go, KEDA 2.20).
SCALER_METADATA = {
    "redis": {"address", "addresses", "host", "hosts", "port", "ports", "username", "password",
              "usernameFromEnv", "passwordFromEnv", "sentinelUsername", "sentinelPassword", "sentinelMaster",
              "unsafeSsl", "listLength", "activationListLength", "listName", "databaseIndex", "enableTLS"},
    "prometheus": {"serverAddress", "query", "queryParameters", "threshold", "activationThreshold", "namespace",
                   "customHeaders", "ignoreNullValues", "unsafeSsl", "awsRegion", "timeout", "identityOwner"},
}
TOKEN = "test-k8s-admin-token-2d9f7c1e83b0a546"


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p != KUSTOMIZATION)


def all_documents() -> list[tuple[str, dict]]:
    return [(f"{path.relative_to(K8S)}:{doc['kind']}/{doc['metadata']['name']}", doc)
            for path in manifest_files() for doc in documents(path)]


def applied() -> dict[tuple[str, str], dict]:
    """What `kubectl apply -k` sends, before kustomize's renaming: (kind, name) -> document."""
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    return {(doc["kind"], doc["metadata"]["name"]): doc
            for resource in kustomization["resources"] for doc in documents(K8S / resource)}


def containers(kind_name: tuple[str, str]) -> list[dict]:
    return applied()[kind_name]["spec"]["template"]["spec"]["containers"]


def env_of(container: dict) -> dict[str, str]:
    """The container's environment: its ConfigMap's data (envFrom), then its own env entries."""
    config = applied()[("ConfigMap", "imgsvc-config")]["data"]
    env = {}
    for source in container.get("envFrom", []):
        if source.get("configMapRef", {}).get("name") == "imgsvc-config":
            env.update(config)
    env.update({item["name"]: item["value"] for item in container.get("env", []) if "value" in item})
    return env


KUBERNETES_DOCS = [(name, doc) for name, doc in all_documents() if not doc["apiVersion"].startswith("keda.sh/")]
KEDA_DOCS = [(name, doc) for name, doc in all_documents() if doc["apiVersion"].startswith("keda.sh/")]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name, doc", KUBERNETES_DOCS, ids=[name for name, _ in KUBERNETES_DOCS])
def test_each_manifest_is_valid_kubernetes(name, doc, version):
    kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("name, doc", KEDA_DOCS, ids=[name for name, _ in KEDA_DOCS])
def test_each_scaled_object_has_only_keda_fields(name, doc):
    jsonschema.Draft202012Validator(KEDA_SCHEMA).validate(doc)
    behavior = doc["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
    if behavior:  # KEDA hands it to the HPA it creates as it is
        hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "x"},
               "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
                        "maxReplicas": 1, "behavior": behavior}}
        kubernetes_validate.validate(hpa, K8S_VERSIONS[-1], strict=True)
    for trigger in doc["spec"]["triggers"]:
        unknown = set(trigger["metadata"]) - SCALER_METADATA[trigger["type"]]
        assert not unknown, f"{trigger['type']} scaler metadata KEDA does not read: {unknown}"


def test_the_keda_check_refuses_what_keda_would_not_take():
    doc = json.loads(json.dumps(KEDA_DOCS[0][1]))
    doc["spec"]["minReplicas"] = 0  # the HPA's spelling, not KEDA's
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(KEDA_SCHEMA).validate(doc)
    doc["spec"].pop("minReplicas")
    doc["spec"]["triggers"][0]["metadata"]["listLength"] = 64  # metadata values are strings
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(KEDA_SCHEMA).validate(doc)


def test_kustomization_lists_every_manifest_and_script():
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    outside = {"ingress-nginx-controller-config.yaml"}  # for the controller's own namespace
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {KUSTOMIZATION.name} - outside
    scripts = {f for generator in kustomization["configMapGenerator"] for f in generator["files"]}
    assert scripts == {p.name for p in K8S.glob("*.py")}
    assert [image["name"] for image in kustomization["images"]] == ["imgsvc"]


def test_services_select_pods_and_pods_use_what_exists():
    objects = applied()
    templates = [doc["spec"]["template"] for doc in objects.values() if "template" in doc.get("spec", {})]
    for (kind, name), doc in objects.items():
        if kind == "Service":
            selector = doc["spec"]["selector"].items()
            pods = [t for t in templates if selector <= t["metadata"]["labels"].items()]
            assert len(pods) == 1, f"Service {name} selects {len(pods)} pod templates"
            ports = {p["name"] for c in pods[0]["spec"]["containers"] for p in c.get("ports", [])}
            assert {p["targetPort"] for p in doc["spec"]["ports"]} <= ports
    generated = {g["name"] for g in yaml.safe_load(KUSTOMIZATION.read_text())["configMapGenerator"]}
    for template in templates:
        for volume in template["spec"].get("volumes", []):
            assert volume["configMap"]["name"] in generated
        for container in template["spec"]["containers"]:
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert ("ConfigMap", source["configMapRef"]["name"]) in objects
                else:
                    assert source["secretRef"]["name"] == "imgsvc-secrets"  # made by hand (config.yaml)


def test_workers_take_a_gpu_each_one_per_node_and_stop_after_draining():
    deployment = applied()[("Deployment", "worker")]
    assert "replicas" not in deployment["spec"]  # KEDA's HPA owns it; a re-apply must not reset it
    spec = deployment["spec"]["template"]["spec"]
    (worker,) = spec["containers"]
    env = env_of(worker)
    assert env["WORKER_DEVICES"] == "auto"
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == worker["resources"]["requests"]["nvidia.com/gpu"] == 1
    (anti,) = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti["topologyKey"] == "kubernetes.io/hostname"
    assert anti["labelSelector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    # The hook addresses worker@<pod name>, the node name Celery's %h gives.
    assert worker["command"][worker["command"].index("-n") + 1] == "worker@%h"
    assert "drain_on_stop.py" in " ".join(worker["lifecycle"]["preStop"]["exec"]["command"])
    # The drain's wait and the last batch's hard limit both fit in the grace period.
    assert spec["terminationGracePeriodSeconds"] >= int(env["DRAIN_WAIT_S"]) + 30
    assert int(env["DRAIN_WAIT_S"]) >= int(env["JOB_TIME_LIMIT_S"])
    for probe in ("startupProbe", "livenessProbe"):
        assert worker[probe]["exec"]["command"][-2:] == ["/opt/imgsvc-k8s/heartbeat_probe.py", "worker"]
    startup = worker["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= Settings().worker_proc_alive_timeout_s


def test_web_is_ready_without_workers_so_jobs_queue_while_they_are_scaled_to_zero():
    (web,) = containers(("Deployment", "web"))
    assert web["readinessProbe"]["httpGet"]["path"] == "/healthz"  # /readyz is 503 with no worker
    assert web["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert env_of(web)["TRUSTED_PROXIES"] == "1"


def test_scaled_object_watches_the_default_models_queue_on_the_main_redis():
    objects = applied()
    (scaler,) = [doc for (kind, _), doc in objects.items() if kind == "ScaledObject"]
    assert (("Deployment", scaler["spec"]["scaleTargetRef"]["name"])) in objects
    assert scaler["spec"]["minReplicaCount"] == 0
    triggers = scaler["spec"]["triggers"]
    namespace = yaml.safe_load(KUSTOMIZATION.read_text())["namespace"]
    main_redis = env_of(containers(("Deployment", "worker"))[0])["REDIS_URL"]  # redis://redis:6379/0
    service, port = main_redis.split("//")[1].split("/")[0].split(":")
    for trigger in triggers:
        assert trigger["metadata"]["address"] == f"{service}.{namespace}.svc.cluster.local:{port}"
        assert trigger["metadata"]["databaseIndex"] == main_redis.rsplit("/", 1)[1]
        assert int(trigger["metadata"]["activationListLength"]) == 0
    # every priority list of the queue (both lanes), each once
    assert [t["metadata"]["listName"] for t in triggers] == priority_lists(inference_queue(Settings().default_model))
    alternative = documents(K8S / "alternatives" / "scaledobject-prometheus.yaml")[0]
    assert inference_queue(Settings().default_model) in alternative["spec"]["triggers"][0]["metadata"]["query"]


def test_ingress_limits_match_the_service():
    from web import MULTIPART_SLACK
    from web.api import MAX_WAIT_S
    from web.batches import BATCH_BODY_IMAGES

    upload = int(applied()[("ConfigMap", "imgsvc-config")]["data"]["MAX_UPLOAD_MB"]) * 1024 * 1024
    caps = {"imgsvc": upload + MULTIPART_SLACK, "imgsvc-batches": upload * BATCH_BODY_IMAGES + 64 * 1024}
    prefix = "nginx.ingress.kubernetes.io/"
    for name, cap in caps.items():
        ingress = applied()[("Ingress", name)]
        annotations = ingress["metadata"]["annotations"]
        assert int(annotations[prefix + "proxy-body-size"].removesuffix("k")) * 1024 == cap
        assert annotations[prefix + "proxy-request-buffering"] == "on"
        assert int(annotations[prefix + "proxy-read-timeout"]) > MAX_WAIT_S
        assert ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == "web"
    paths = applied()[("Ingress", "imgsvc-batches")]["spec"]["rules"][0]["http"]["paths"]
    assert [(p["path"], p["pathType"]) for p in paths] == [("/api/v1/batches", "Exact")]
    controller = documents(K8S / "ingress-nginx-controller-config.yaml")[0]["data"]
    assert int(controller["client-header-timeout"]) <= 10 and int(controller["client-body-timeout"]) <= 30


def run_script(name: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(K8S / name), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


@pytest.mark.integration
def test_heartbeat_probe_and_drain_hook_on_a_real_worker(tmp_path_factory):
    cards = write_slow_card(tmp_path_factory.mktemp("k8s-cards"))
    redis_proc, url = start_redis(tmp_path_factory.mktemp("k8s-redis"))
    settings = Settings(redis_url=url, model_cards_dir=cards, models=("slow",), default_model="slow",
                        worker_devices="cpu", worker_concurrency=1, torch_threads=1, heartbeat_interval_s=1,
                        worker_ttl_s=4, admin_token=TOKEN)
    ARTIFACTS.mkdir(exist_ok=True)
    host = socket.gethostname()
    worker = start_worker(settings, ARTIFACTS / "k8s-worker.log", "worker")  # node worker@<host>, as in the pod
    web, base = start_web(settings)
    probe_env = {"REDIS_URL": url, "WORKER_TTL_S": "4", "HOSTNAME": host}
    try:
        assert run_script("heartbeat_probe.py", "worker", env=probe_env).returncode == 0
        other = run_script("heartbeat_probe.py", "worker", env={**probe_env, "HOSTNAME": "another-pod"})
        assert other.returncode == 1 and "no heartbeat" in other.stderr
        assert run_script("heartbeat_probe.py", "webhooks", env=probe_env).returncode == 1  # none runs here
        away = run_script("heartbeat_probe.py", "worker", env={**probe_env,
                                                               "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
        assert away.returncode == 0 and "unreachable" in away.stderr  # Redis down: not the pod's fault

        drained = run_script("drain_on_stop.py", env={"IMGSVC_URL": base, "ADMIN_TOKEN": TOKEN, "HOSTNAME": host,
                                                      "DRAIN_WAIT_S": "20"})
        assert drained.returncode == 0 and "is idle" in drained.stdout, drained.stderr
        nodes = requests.get(f"{base}/api/v1/admin/workers", headers={"Authorization": f"Bearer {TOKEN}"},
                             timeout=10).json()["workers"]
        assert [(n["name"], n["status"]) for n in nodes] == [(f"worker@{host}", "draining")]
        queued = requests.post(f"{base}/api/v1/jobs", files={"image": ("x.png", _png(), "image/png")}, timeout=30)
        wait_for(lambda: requests.get(f"{base}/api/v1/admin/queues", headers={"Authorization": f"Bearer {TOKEN}"},
                                      timeout=10).json()["queues"][0]["depth"] == 1, 5, "the job to wait")
        assert requests.get(f"{base}/api/v1/jobs/{queued.json()['id']}", timeout=10).json()["status"] == "queued"

        lost = run_script("drain_on_stop.py", env={"IMGSVC_URL": f"http://127.0.0.1:{free_port()}",
                                                   "ADMIN_TOKEN": TOKEN, "HOSTNAME": host})
        assert lost.returncode == 0 and "could not drain" in lost.stderr  # SIGTERM comes all the same
    finally:
        for proc in (web, worker, redis_proc):
            stop(proc)


def _png() -> bytes:
    from tests import images

    return images.noise_png(72_000)
