"""KubeRay manifests: one template (this module) + a preset (`ray_configs/NAME.yaml`).

`raycluster(preset)` is the long-running cluster checked in as `kube/raycluster-NAME.yaml`;
`rayjob(...)` wraps the same cluster spec around one experiment or sweep; `pod_monitors(preset)`
are the Prometheus-operator PodMonitors that scrape both (`kube/monitoring/podmonitors-NAME.yaml`).

Validation against the KubeRay CRDs (the v1 `openAPIV3Schema`) happens in the tests and, on
demand, in `raydiology kube validate --crds DIR`: the platform does not ship a copy of the
schemas (the pod template alone is ~15k lines of Kubernetes API). The CRD schemas leave most
objects open (no `additionalProperties: false`), which would let a misspelt field through;
`strict_schema` closes every object that lists `properties`, unless it is marked
`x-kubernetes-preserve-unknown-fields`, so a typo fails the way a server-side apply would.
"""

from __future__ import annotations

import copy
import functools
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from raydiology.cluster.presets import (
    ClusterPreset,
    NetworkConfig,
    Versions,
    _bytes,
    load_versions,
)

API_VERSION = "ray.io/v1"
RUNS_MOUNT = "/mnt/runs"  # the shared PVC: Ray Train's storage_path must be shared across nodes
METRICS_PORT = 8080
# The head's other Prometheus endpoints: Ray's defaults for the autoscaler
# (ray/autoscaler/_private/constants.py AUTOSCALER_METRIC_PORT) and the dashboard
# (ray/dashboard/consts.py DASHBOARD_METRIC_PORT), named as KubeRay's monitoring guide names them.
HEAD_METRICS_PORTS = {"as-metrics": 44217, "dash-metrics": 44227}
MONITORING_API_VERSION = "monitoring.coreos.com/v1"
MULTUS_ANNOTATION = "k8s.v1.cni.cncf.io/networks"
HEADER = (
    "# Rendered by `raydiology kube {command} --cluster {name}` from ray_configs/{name}.yaml and\n"
    "# ray_configs/versions.yaml. Do not edit by hand: change the preset and re-render.\n"
)


class ManifestError(ValueError):
    """A manifest that the KubeRay CRD schema rejects; `errors` lists 'path: message' lines."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.errors = errors
        super().__init__(
            f"{source} does not match the KubeRay CRD schema:\n  " + "\n  ".join(errors)
        )


# --------------------------------------------------------------------------- rendering


def raycluster(preset: ClusterPreset, versions: Versions | None = None) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "RayCluster",
        "metadata": {"name": cluster_name(preset), "labels": _labels(preset)},
        "spec": cluster_spec(preset, versions or load_versions()),
    }


def cluster_name(preset: ClusterPreset) -> str:
    return f"raydiology-{preset.name}"


def cluster_spec(preset: ClusterPreset, versions: Versions) -> dict[str, Any]:
    image = preset.image or versions.image
    gpu, cpu = preset.gpu_nodes, preset.cpu_nodes
    return {
        "rayVersion": versions.ray_version,
        # Ray rejects every request without the cluster's token; the operator makes the token
        # Secret (named after the cluster, key auth_token) and sets RAY_AUTH_* in every pod.
        "authOptions": {"mode": "token"},
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "version": "v2",
            "upscalingMode": "Default",
            "idleTimeoutSeconds": preset.idle_timeout_s,
            "resources": _resources(cpus=1, memory="2Gi"),
        },
        # The GCS keeps its tables in Redis, so a restarted head finds its jobs and workers.
        "gcsFaultToleranceOptions": {
            "redisAddress": preset.redis.address,
            "redisPassword": {
                "valueFrom": {
                    "secretKeyRef": {"name": preset.redis.password_secret, "key": "password"}
                }
            },
        },
        "headGroupSpec": {
            "serviceType": "ClusterIP",  # reach it with `kubectl port-forward`, never a public LB
            "rayStartParams": {
                "num-cpus": "0",  # no tasks on the head: drivers, GCS and dashboard only
                "num-gpus": "0",
                "dashboard-host": "0.0.0.0",  # inside the pod network; token auth is on
                "metrics-export-port": str(METRICS_PORT),
            },
            "template": _pod(
                preset,
                image,
                versions,
                container="ray-head",
                cpus=preset.head.cpus,
                memory=preset.head.memory,
                shm="8Gi",
                ports=[
                    ("gcs-server", 6379),
                    ("dashboard", 8265),
                    ("client", 10001),
                    *HEAD_METRICS_PORTS.items(),
                ],
                # the dashboard's Metrics tab: Prometheus to query, Grafana to embed
                env=preset.monitoring.head_env(),
            ),
        },
        "workerGroupSpecs": [
            {
                "groupName": f"gpu-{preset.name}",
                "replicas": gpu.replicas,
                "minReplicas": gpu.min_replicas,
                "maxReplicas": gpu.max_replicas,
                "idleTimeoutSeconds": preset.idle_timeout_s,
                # Experiments ask for A800 vs A100 through Ray's accelerator type: a resource
                # the autoscaler can scale this group for, and a node label for selectors.
                "resources": {f"accelerator_type:{preset.accelerator_type}": "1"},
                "labels": {"ray.io/accelerator-type": preset.accelerator_type},
                "rayStartParams": _start_params(gpu.object_store),
                "template": _pod(
                    preset,
                    image,
                    versions,
                    container="ray-worker",
                    cpus=gpu.cpus,
                    memory=gpu.memory,
                    gpus=gpu.gpus,
                    shm=gpu.shm,
                    network=preset.network,
                ),
            },
            {
                "groupName": "cpu-data",
                "replicas": cpu.replicas,
                "minReplicas": cpu.min_replicas,
                "maxReplicas": cpu.max_replicas,
                "idleTimeoutSeconds": preset.idle_timeout_s,
                "rayStartParams": _start_params(cpu.object_store),
                "template": _pod(
                    preset,
                    image,
                    versions,
                    container="ray-worker",
                    cpus=cpu.cpus,
                    memory=cpu.memory,
                    shm=cpu.shm,
                ),
            },
        ],
    }


def pod_monitors(preset: ClusterPreset) -> list[dict[str, Any]]:
    """Prometheus-operator PodMonitors for every cluster of `preset` (the long-running one and
    each RayJob's): the head's three endpoints and every worker's, each series labelled with
    its RayCluster's name (`ray_io_cluster`) as KubeRay's monitoring guide does."""
    monitoring = preset.monitoring
    relabel = [
        {
            "action": "replace",
            "sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"],
            "targetLabel": "ray_io_cluster",
        }
    ]

    def monitor(node_type: str, ports: list[str]) -> dict[str, Any]:
        return {
            "apiVersion": MONITORING_API_VERSION,
            "kind": "PodMonitor",
            "metadata": {
                "name": f"{cluster_name(preset)}-{node_type}",
                "namespace": monitoring.namespace,
                "labels": {"release": monitoring.release, **_labels(preset)},
            },
            "spec": {
                "namespaceSelector": {"matchNames": [monitoring.ray_namespace]},
                # KubeRay labels every pod with its node type; ours carry the preset's name
                "selector": {"matchLabels": {**_labels(preset), "ray.io/node-type": node_type}},
                "podMetricsEndpoints": [{"port": port, "relabelings": relabel} for port in ports],
            },
        }

    return [monitor("head", ["metrics", *HEAD_METRICS_PORTS]), monitor("worker", ["metrics"])]


def rayjob(
    *,
    preset: ClusterPreset,
    name: str,
    entrypoint: str,
    labels: dict[str, str],
    runtime_env: dict[str, Any],
    existing_cluster: bool = False,
    ttl_s: int = 3600,
    deadline_s: int = 14 * 24 * 3600,
    backoff_limit: int = 2,
    versions: Versions | None = None,
) -> dict[str, Any]:
    """A RayJob that runs `entrypoint` on a fresh cluster of `preset` (or on the long-running
    `raydiology-NAME` cluster with `existing_cluster`).

    backoff_limit > 0 is safe: a retried run resumes from its last checkpoint (same run name).
    """
    spec: dict[str, Any] = {
        "entrypoint": entrypoint,
        "runtimeEnvYAML": yaml.safe_dump(runtime_env, sort_keys=False),
        "submissionMode": "K8sJobMode",
        "activeDeadlineSeconds": deadline_s,
        "backoffLimit": backoff_limit,
    }
    if existing_cluster:
        spec["clusterSelector"] = {"ray.io/cluster": cluster_name(preset)}
    else:
        spec["shutdownAfterJobFinishes"] = True  # GPUs go back when the run ends
        spec["ttlSecondsAfterFinished"] = ttl_s  # keep logs/status this long after that
        spec["rayClusterSpec"] = cluster_spec(preset, versions or load_versions())
    return {
        "apiVersion": API_VERSION,
        "kind": "RayJob",
        "metadata": {"name": dns_name(name), "labels": {**_labels(preset), **labels}},
        "spec": spec,
    }


def job_entrypoint(command: list[str]) -> str:
    return shlex.join(["raydiology", *command])


def dns_name(text: str, limit: int = 50) -> str:
    """A DNS-1123 name (RayJob names become pod/service name prefixes, so keep it short)."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return name[:limit].rstrip("-") or "raydiology"


def label_value(text: str) -> str:
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63]
    return value.strip("-_.") or "none"


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (runtimeEnvYAML) as `|` blocks, so the YAML inside stays readable;
    a repeated value written out each time, never as an anchor and alias."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_Dumper.add_representer(
    str,
    lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None),
)


def dump(doc: dict[str, Any], header: str = "") -> str:
    return header + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=4096)


def _labels(preset: ClusterPreset) -> dict[str, str]:
    return {"app.kubernetes.io/name": "raydiology", "raydiology.io/cluster": preset.name}


def _start_params(object_store: str | None) -> dict[str, str]:
    params = {"metrics-export-port": str(METRICS_PORT)}
    if object_store:
        params["object-store-memory"] = str(_bytes(object_store))
    return params


def _resources(
    *, cpus: int, memory: str, gpus: int = 0, extra: dict[str, int] | None = None
) -> dict[str, Any]:
    amounts = {"cpu": str(cpus), "memory": memory}
    if gpus:
        amounts["nvidia.com/gpu"] = str(gpus)
    amounts.update({name: str(count) for name, count in (extra or {}).items()})
    return {"limits": dict(amounts), "requests": dict(amounts)}


def _pod(
    preset: ClusterPreset,
    image: str,
    versions: Versions,
    *,
    container: str,
    cpus: int,
    memory: str,
    shm: str,
    gpus: int = 0,
    ports: list[tuple[str, int]] | None = None,
    network: NetworkConfig | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One group's pod template; `network` (GPU groups) adds the RDMA device and NCCL's env."""
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "runs", "mountPath": RUNS_MOUNT}]
    env = {
        "RAYDIOLOGY_VERSION": versions.raydiology_version,
        # DeepSpeed JIT-builds small ops once; keep them on the shared volume.
        "TORCH_EXTENSIONS_DIR": f"{RUNS_MOUNT}/.torch_extensions",
        **(env or {}),
    }
    rdma = {}
    if network is not None:
        env.update(network.nccl_env())
        if network.rdma_resource:
            rdma[network.rdma_resource] = network.rdma_devices
    body: dict[str, Any] = {
        "name": container,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "workingDir": versions.workdir,
        "env": [{"name": name, "value": value} for name, value in env.items()],
        "resources": _resources(cpus=cpus, memory=memory, gpus=gpus, extra=rdma),
        "volumeMounts": mounts,
    }
    if rdma:
        # RDMA registers (pins) NCCL's buffers: the container may lock memory beyond the
        # default memlock limit. /dev/shm (above) is memory-backed for NCCL's intra-node path.
        body["securityContext"] = {"capabilities": {"add": ["IPC_LOCK"]}}
    body["ports"] = [
        *({"name": n, "containerPort": p} for n, p in ports or []),
        {"name": "metrics", "containerPort": METRICS_PORT},
    ]
    spec: dict[str, Any] = {
        "containers": [body],
        "volumes": [
            # /dev/shm as RAM: NCCL's buffers and Ray's object store live here.
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}},
            {"name": "runs", "persistentVolumeClaim": {"claimName": preset.runs_claim}},
        ],
    }
    if gpus:
        spec["nodeSelector"] = {"nvidia.com/gpu.product": preset.gpu_product}
        spec["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    metadata: dict[str, Any] = {"labels": _labels(preset)}
    if network is not None and network.attachments:
        metadata["annotations"] = {MULTUS_ANNOTATION: network.attachments}
    return {"metadata": metadata, "spec": spec}


# --------------------------------------------------------------------------- validation

CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}


def default_crd_dir() -> Path:
    """Where this workplace keeps the KubeRay CRDs (`../shared/reference/kuberay-crds/`)."""
    return Path(__file__).resolve().parents[4] / "shared" / "reference" / "kuberay-crds"


def crd_schema(kind: str, crd_dir: Path, version: str = "v1") -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~20k lines
    crd = yaml.load((Path(crd_dir) / CRD_FILES[kind]).read_text(), Loader=loader)
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise KeyError(f"{kind} CRD has no version {version}")


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy where every object listing `properties` rejects keys it does not list."""
    out = copy.deepcopy(schema)

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for key, value in node.items():
                # `properties` maps field names to schemas: recurse into the schemas only.
                if key == "properties":
                    for sub in value.values():
                        close(sub)
                else:
                    close(value)
        elif isinstance(node, list):
            for item in node:
                close(item)

    close(out)
    return out


def validate(doc: dict[str, Any], crd_dir: Path, *, source: str = "manifest") -> None:
    """Raise ManifestError listing every place `doc` breaks its kind's (strict) CRD schema."""
    kind = doc.get("kind")
    if kind not in CRD_FILES or doc.get("apiVersion") != API_VERSION:
        raise ManifestError(
            source,
            [
                f"apiVersion/kind: expected {API_VERSION} {sorted(CRD_FILES)}, got "
                f"{doc.get('apiVersion')} {kind}"
            ],
        )
    validator = _validator(kind, str(Path(crd_dir).resolve()))
    errors = [
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]
    if errors:
        raise ManifestError(source, errors)


@functools.lru_cache(maxsize=4)
def _validator(kind: str, crd_dir: str) -> Any:
    import jsonschema

    return jsonschema.Draft7Validator(strict_schema(crd_schema(kind, Path(crd_dir))))


def validate_file(path: Path, crd_dir: Path) -> int:
    """Validate every document of a YAML file; returns how many there were."""
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    for i, doc in enumerate(docs):
        validate(doc, crd_dir, source=f"{path}" + (f" (document {i + 1})" if len(docs) > 1 else ""))
    return len(docs)
