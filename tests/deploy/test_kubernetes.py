"""``deploy/kubernetes``: the base and each overlay render with ``kubectl kustomize``,
every core object validates strictly against Kubernetes' own schemas
(``kubernetes-validate``), and the manifests say what docs/deploy.md promises:
probes on the right endpoints, a grace period covering the preStop pause and the
drain, no pod lost to a rollout or a node drain, secrets referenced and never
written, and autoscaling on a metric the service exports."""

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from prometheus_client import generate_latest

from app.server import DRAIN_ACCEPT_S
from app.serving.metrics import Metrics
from tests.app.conftest import REPO
from tests.deploy.conftest import missing

KUBERNETES = REPO / "deploy" / "kubernetes"
OVERLAYS = ("gpu", "cpu", "keda", "s3")
# the preStop `sleep` action needs 1.30; the package's newest is today's Kubernetes
VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CUSTOM = {"PodMonitor", "ScaledObject"}  # CRDs: checked below, not by the core schemas
SECRET_VARIABLES = ("MASKRCNN_DATABASE_URL", "MASKRCNN_ADMIN_TOKEN", "MASKRCNN_API_TOKENS")


def render(folder: Path) -> dict[tuple[str, str], dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        missing("kubectl is not installed: apt-get install kubernetes-client")
    result = subprocess.run(
        [kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    objects = [o for o in yaml.safe_load_all(result.stdout) if o]
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[tuple[str, str], dict]]:
    return {"base": render(KUBERNETES)} | {o: render(KUBERNETES / "overlays" / o) for o in OVERLAYS}


def pod(objects, name: str) -> dict:
    return objects["Deployment", name]["spec"]["template"]


def container(objects, name: str) -> dict:
    [only] = pod(objects, name)["spec"]["containers"]
    return only


def settings(objects) -> dict[str, str]:
    [config] = [o for (kind, _), o in objects.items() if kind == "ConfigMap"]
    return config["data"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


@pytest.mark.parametrize("version", VERSIONS)
def test_every_core_object_validates_strictly(rendered, version):
    for variant, objects in rendered.items():
        for (kind, name), manifest in objects.items():
            if kind in CUSTOM:
                continue
            try:
                kubernetes_validate.validate(manifest, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{variant}: {kind}/{name} on {version}: {e}")


def test_the_api_is_probed_drained_and_never_all_down(rendered):
    for variant, objects in rendered.items():
        api = container(objects, "maskrcnn-api")
        assert api["startupProbe"]["httpGet"]["path"] == "/readyz", variant
        assert api["readinessProbe"]["httpGet"]["path"] == "/readyz", variant
        assert api["livenessProbe"]["httpGet"]["path"] == "/healthz", variant
        startup = api["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "5 min to load"
        pause = api["lifecycle"]["preStop"]["sleep"]["seconds"]
        drain = DRAIN_ACCEPT_S + float(settings(objects)["MASKRCNN_REQUEST_TIMEOUT_S"]) + 5
        grace = pod(objects, "maskrcnn-api")["spec"]["terminationGracePeriodSeconds"]
        assert grace >= pause + drain, variant
        spec = objects["Deployment", "maskrcnn-api"]["spec"]
        assert "replicas" not in spec, "the autoscaler owns the count: an apply must not reset it"
        strategy = spec["strategy"]
        assert strategy["rollingUpdate"]["maxUnavailable"] == 0
        assert api["resources"]["requests"] and api["resources"]["limits"]["memory"]
        assert {"name": "MASKRCNN_RUN_WORKER", "value": "false"} in api["env"]
        budget = objects["PodDisruptionBudget", "maskrcnn-api"]["spec"]
        api_labels = pod(objects, "maskrcnn-api")["metadata"]["labels"]
        worker_labels = pod(objects, "maskrcnn-worker")["metadata"]["labels"]
        assert budget["maxUnavailable"] == 1 and selects(
            budget["selector"]["matchLabels"], api_labels
        )
        service = objects["Service", "maskrcnn-api"]["spec"]
        assert selects(service["selector"], api_labels)
        assert not selects(service["selector"], worker_labels)
        assert service["ports"][0]["targetPort"] in [p["name"] for p in api["ports"]]


def test_the_worker_has_no_http_probes_and_time_to_stop_its_job(rendered):
    for objects in rendered.values():
        worker = container(objects, "maskrcnn-worker")
        assert worker["args"] == ["worker"]
        assert not {"startupProbe", "readinessProbe", "livenessProbe"} & set(worker)
        # SIGTERM, then SIGKILL after 10 s to its training child, then the job's record
        assert pod(objects, "maskrcnn-worker")["spec"]["terminationGracePeriodSeconds"] >= 30


def test_secrets_are_referenced_never_written(rendered):
    for variant, objects in rendered.items():
        assert not [name for kind, name in objects if kind == "Secret"], variant
        for name in ("maskrcnn-api", "maskrcnn-worker"):
            env = {e["name"]: e for e in container(objects, name)["env"]}
            for variable, entry in env.items():
                if variable in SECRET_VARIABLES or "TOKEN" in variable or "AWS" in variable:
                    assert "value" not in entry, (variant, name, variable)
                    assert entry["valueFrom"]["secretKeyRef"]["name"] == "maskrcnn"
            assert "MASKRCNN_DATABASE_URL" in env
        assert not set(SECRET_VARIABLES) & set(settings(objects)), "no secret in the ConfigMap"
    example = yaml.safe_load((KUBERNETES / "secret.example.yaml").read_text())
    keys = {
        e["valueFrom"]["secretKeyRef"]["key"]
        for objects in rendered.values()
        for name in ("maskrcnn-api", "maskrcnn-worker")
        for e in container(objects, name)["env"]
        if "valueFrom" in e
    }
    assert keys <= set(example["stringData"]), "the example names every key the pods read"


def exported_metrics() -> str:
    return generate_latest(Metrics().registry).decode()


def test_autoscaling_is_on_the_queue_the_service_exports(rendered):
    objects = rendered["base"]
    hpa = objects["HorizontalPodAutoscaler", "maskrcnn-api"]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "maskrcnn-api",
    }
    [metric] = hpa["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert f"# TYPE {name} gauge" in exported_metrics()
    batch = settings(objects)["MASKRCNN_MAX_BATCH_SIZE"]
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": batch}
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] > hpa["minReplicas"]

    adapter = yaml.safe_load((KUBERNETES / "prometheus-adapter-rules.yaml").read_text())
    [rule] = adapter["rules"]["custom"]
    assert rule["name"]["as"] == name and name in rule["seriesQuery"]

    monitor = objects["PodMonitor", "maskrcnn-api"]["spec"]
    api_labels = pod(objects, "maskrcnn-api")["metadata"]["labels"]
    assert selects(monitor["selector"]["matchLabels"], api_labels)
    [endpoint] = monitor["podMetricsEndpoints"]
    ports = [p["name"] for p in container(objects, "maskrcnn-api")["ports"]]
    assert endpoint["path"] == "/metrics" and endpoint["port"] in ports


def test_keda_replaces_the_hpa_on_the_same_signal(rendered):
    objects = rendered["keda"]
    assert not [name for kind, name in objects if kind == "HorizontalPodAutoscaler"]
    scaled = objects["ScaledObject", "maskrcnn-api"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == "maskrcnn-api"
    [trigger] = scaled["triggers"]
    assert trigger["type"] == "prometheus"
    assert "maskrcnn_queue_depth" in trigger["metadata"]["query"]
    assert trigger["metadata"]["threshold"] == settings(objects)["MASKRCNN_MAX_BATCH_SIZE"]


def test_the_overlays_place_pods_on_gpu_or_cpu_nodes(rendered):
    for name in ("maskrcnn-api", "maskrcnn-worker"):
        gpu = rendered["gpu"]
        assert container(gpu, name)["resources"]["limits"]["nvidia.com/gpu"] == 1
        tolerations = pod(gpu, name)["spec"]["tolerations"]
        assert {
            "key": "nvidia.com/gpu",
            "operator": "Exists",
            "effect": "NoSchedule",
        } in tolerations
        assert "nvidia.com/gpu" not in container(rendered["base"], name)["resources"]["limits"]
    shm = {v["name"]: v for v in pod(rendered["gpu"], "maskrcnn-worker")["spec"]["volumes"]}["shm"]
    assert shm["emptyDir"]["medium"] == "Memory"  # NCCL between the worker's GPUs
    mounts = container(rendered["gpu"], "maskrcnn-worker")["volumeMounts"]
    assert {"name": "shm", "mountPath": "/dev/shm"} in mounts
    cpu = rendered["cpu"]
    assert settings(cpu)["MASKRCNN_DEVICE"] == "cpu"
    assert int(container(cpu, "maskrcnn-api")["resources"]["requests"]["cpu"]) >= 4


def test_a_job_asks_for_no_more_processes_than_the_worker_pod_runs(rendered):
    for variant, objects in rendered.items():
        limit = int(settings(objects)["MASKRCNN_JOB_MAX_PROCESSES"])
        resources = container(objects, "maskrcnn-worker")["resources"]
        gpus = int(resources["limits"].get("nvidia.com/gpu", 0))
        assert 1 <= limit <= (gpus or int(resources["requests"]["cpu"])), variant


def test_the_trainjob_example_runs_maskrcnn_train_under_torchrun_on_the_data_volume(rendered):
    """Not part of any kustomization (it needs Kubeflow Trainer): its command is one
    that ``maskrcnn train`` takes, on the base's image and volume."""
    from app.cli import build_parser

    example = KUBERNETES / "examples" / "trainjob.yaml"
    job = yaml.safe_load(example.read_text())
    assert (job["apiVersion"], job["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert all(("TrainJob", job["metadata"]["name"]) not in o for o in rendered.values())
    spec, trainer = job["spec"], job["spec"]["trainer"]
    assert spec["runtimeRef"]["name"] == "torch-distributed"
    assert trainer["command"] == ["python", "-m", "torch.distributed.run"]
    module, command = trainer["args"][:2], trainer["args"][2:]
    assert module == ["-m", "app.cli"] and command[0] == "train"
    args = build_parser("train").parse_args(command)  # exits on a flag it does not take
    assert args.base_model == "coco"

    base = yaml.safe_load((KUBERNETES / "base" / "kustomization.yaml").read_text())
    [image] = base["images"]
    assert trainer["image"] == f"{image['newName']}:{image['newTag']}"
    gpus = trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"]
    assert trainer["numProcPerNode"] == gpus and trainer["numNodes"] >= 2

    [override] = spec["podTemplateOverrides"]
    [volume] = override["spec"]["volumes"]
    [node] = override["spec"]["containers"]
    [mount] = node["volumeMounts"]
    assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in rendered[
        "base"
    ]
    data_dir = settings(rendered["base"])["MASKRCNN_DATA_DIR"]
    assert mount == {"name": volume["name"], "mountPath": data_dir}
    assert args.dataset.startswith(data_dir + "/") and args.out.startswith(data_dir + "/")


def test_with_a_bucket_no_pod_needs_another_s_disk(rendered):
    objects = rendered["s3"]
    assert not [name for kind, name in objects if kind == "PersistentVolumeClaim"]
    assert settings(objects)["MASKRCNN_STORAGE_URL"].startswith("s3://")
    for name in ("maskrcnn-api", "maskrcnn-worker"):
        volumes = {v["name"]: v for v in pod(objects, name)["spec"]["volumes"]}
        [mount] = [m for m in container(objects, name)["volumeMounts"] if m["name"] == "data"]
        assert mount["mountPath"] == settings(objects)["MASKRCNN_DATA_DIR"]
        assert set(volumes["data"]) == {"name", "emptyDir"}  # its own cache
        env = {e["name"]: e for e in container(objects, name)["env"]}
        for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[variable]["valueFrom"]["secretKeyRef"]["optional"] is True  # or IRSA
    assert any(kind == "PersistentVolumeClaim" for kind, _ in rendered["base"])
