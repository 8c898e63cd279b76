"""Per-cluster presets (`ray_configs/NAME.yaml`) and the pinned image (`ray_configs/versions.yaml`).

One preset feeds three things: the RayCluster manifest in `kube/`, the RayJob that
`raydiology kube render` writes, and the scaling that `raydiology run --cluster NAME` overlays
onto an experiment. Keeping them in one file keeps the three from drifting apart.

`versions.yaml` also drives the image build (`kube/image/build.sh` runs
`docker_build_command()`), so the tag the manifests pull is the tag that was built.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raydiology.config_base import ConfigError, check, from_dict

QUANTITY_HINT = "a Kubernetes quantity such as '64Gi'"


@dataclass(kw_only=True)
class NodeGroup:
    """One kind of pod: its CPU/memory/GPU limits, /dev/shm and replica bounds."""

    cpus: int
    memory: str
    gpus: int = 0
    shm: str = "8Gi"
    object_store: str | None = None  # Ray object store size; null = Ray's default share
    replicas: int = 0
    min_replicas: int = 0
    max_replicas: int = 1

    def validate(self, key: str) -> None:
        check(self.cpus >= 1, f"{key}.cpus", self.cpus, "at least 1")
        check(self.gpus >= 0, f"{key}.gpus", self.gpus, ">= 0")
        for name in ("memory", "shm", "object_store"):
            value = getattr(self, name)
            if value is not None:
                check(_bytes(value) > 0, f"{key}.{name}", value, QUANTITY_HINT)
        check(
            0 <= self.min_replicas <= self.replicas <= self.max_replicas,
            f"{key}.replicas",
            (self.min_replicas, self.replicas, self.max_replicas),
            "0 <= min_replicas <= replicas <= max_replicas",
        )


@dataclass(kw_only=True)
class HeadGroup:
    cpus: int = 8
    memory: str = "32Gi"

    def validate(self, key: str) -> None:
        check(self.cpus >= 1, f"{key}.cpus", self.cpus, "at least 1")
        check(_bytes(self.memory) > 0, f"{key}.memory", self.memory, QUANTITY_HINT)


@dataclass(kw_only=True)
class RedisConfig:
    address: str
    password_secret: str  # a Secret with key `password`


# NCCL settings for multi-node jobs over the RDMA fabric (InfiniBand or RoCE). A preset's
# `network.env` is merged onto these: a key it names replaces the default, a key set to null is
# left out (NCCL then decides), and any other variable it adds is set as well.
NCCL_DEFAULTS: dict[str, str] = {
    "NCCL_IB_HCA": "mlx5",  # every mlx5_* port; list the compute ports to leave storage NICs out
    "NCCL_SOCKET_IFNAME": "eth0",  # bootstrap and TCP fallback: the pod's primary interface
    "NCCL_IB_GID_INDEX": "3",  # RoCE v2 over IPv4 on most NICs (NCCL reads it in RoCE mode only)
    "NCCL_NET_GDR_LEVEL": "PHB",  # GPUDirect RDMA when GPU and NIC sit under one host bridge
    "NCCL_DEBUG": "WARN",  # INFO prints the rings/transports chosen: use it to debug a fabric
}
DEFAULT_RDMA_RESOURCE = "rdma/rdma_shared_device_a"  # NVIDIA Network Operator's shared RDMA plugin
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_RESOURCE_NAME = re.compile(
    r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
)


@dataclass(kw_only=True)
class NetworkConfig:
    """The fast fabric a multi-node job needs on the GPU pods: the RDMA device the site's device
    plugin advertises, the NCCL variables that steer traffic onto it, and optionally a Multus
    secondary network (RoCE setups usually attach the RDMA NIC that way)."""

    # Extended resource of the site's RDMA device plugin; null = no RDMA (NCCL falls back to
    # TCP sockets: fine on one node, slow across nodes).
    rdma_resource: str | None = DEFAULT_RDMA_RESOURCE
    rdma_devices: int = 1  # how many of that resource each GPU pod requests
    env: dict[str, Any] = field(default_factory=dict)  # merged onto NCCL_DEFAULTS
    attachments: str | None = None  # pod annotation k8s.v1.cni.cncf.io/networks (Multus)

    def validate(self, key: str) -> None:
        if self.rdma_resource is not None:
            check(
                bool(_RESOURCE_NAME.fullmatch(self.rdma_resource)),
                f"{key}.rdma_resource",
                self.rdma_resource,
                "an extended resource name such as 'rdma/rdma_shared_device_a', or null",
            )
        check(self.rdma_devices >= 1, f"{key}.rdma_devices", self.rdma_devices, "at least 1")
        for name, value in self.env.items():
            check(
                bool(_ENV_NAME.fullmatch(str(name))),
                f"{key}.env.{name}",
                value,
                "an environment variable name ([A-Za-z_][A-Za-z0-9_]*)",
            )
            check(
                value is None or isinstance(value, (str, int, float, bool)),
                f"{key}.env.{name}",
                value,
                "a string, a number or null",
            )

    def nccl_env(self) -> dict[str, str]:
        """NCCL_DEFAULTS with this preset's `env` merged on (null drops a variable)."""
        merged: dict[str, Any] = {**NCCL_DEFAULTS, **self.env}
        return {name: _env_value(value) for name, value in merged.items() if value is not None}


# The kube-prometheus-stack that KubeRay's monitoring guide installs (Ray docs, "Using Prometheus
# and Grafana", step 2 and the env of ray-cluster.embed-grafana.yaml): Helm release
# `prometheus` in namespace `prometheus-system`.
@dataclass(kw_only=True)
class MonitoringConfig:
    """The site's Prometheus operator and Grafana: where the PodMonitors go, and the addresses
    the head's dashboard needs to fill its Metrics tab (Ray reads RAY_PROMETHEUS_HOST and
    RAY_GRAFANA_HOST from the head; the browser loads panels from RAY_GRAFANA_IFRAME_HOST)."""

    namespace: str = "prometheus-system"  # where the PodMonitors are created
    release: str = "prometheus"  # label value the Prometheus selects PodMonitors by
    ray_namespace: str = "ray"  # where the Ray pods run
    prometheus_host: str | None = (
        "http://prometheus-kube-prometheus-prometheus.prometheus-system.svc:9090"
    )
    grafana_host: str | None = "http://prometheus-grafana.prometheus-system.svc:80"
    grafana_iframe_host: str | None = "http://127.0.0.1:3000"  # `kubectl port-forward` to Grafana

    def validate(self, key: str) -> None:
        for name in ("prometheus_host", "grafana_host", "grafana_iframe_host"):
            value = getattr(self, name)
            check(
                value is None or bool(re.match(r"https?://[^/\s]+", value)),
                f"{key}.{name}",
                value,
                "a URL with its scheme (http:// or https://), or null",
            )

    def head_env(self) -> dict[str, str]:
        hosts = {
            "RAY_PROMETHEUS_HOST": self.prometheus_host,
            "RAY_GRAFANA_HOST": self.grafana_host,
            "RAY_GRAFANA_IFRAME_HOST": self.grafana_iframe_host,
        }
        return {name: value for name, value in hosts.items() if value is not None}


@dataclass(kw_only=True)
class ClusterPreset:
    name: str
    accelerator_type: (
        str  # Ray's name: resource accelerator_type:<it>, label ray.io/accelerator-type
    )
    gpu_product: str  # node label nvidia.com/gpu.product
    scaling: dict[str, Any] = field(default_factory=dict)  # overlay onto `scaling:`
    gpu_nodes: NodeGroup
    cpu_nodes: NodeGroup
    head: HeadGroup = field(default_factory=HeadGroup)
    redis: RedisConfig
    network: NetworkConfig = field(default_factory=NetworkConfig)  # the GPU pods' RDMA + NCCL
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    runs_claim: str = "raydiology-runs"
    idle_timeout_s: int = 600
    image: str | None = None  # only for a cluster that needs another build than versions.yaml

    def validate(self, key: str) -> None:
        from raydiology.config import ScalingSection

        check(self.gpu_nodes.gpus >= 1, "gpu_nodes.gpus", self.gpu_nodes.gpus, ">= 1")
        check(self.cpu_nodes.gpus == 0, "cpu_nodes.gpus", self.cpu_nodes.gpus, "0")
        scaling = from_dict(ScalingSection, self.scaling, "scaling")  # names the bad key
        per_node = self.gpu_nodes.gpus / max(scaling.gpus_per_worker, 1e-9)
        check(
            not scaling.use_gpu
            or scaling.cpus_per_worker * min(per_node, scaling.num_workers) <= self.gpu_nodes.cpus,
            "scaling.cpus_per_worker",
            scaling.cpus_per_worker,
            f"at most gpu_nodes.cpus / workers per node ({self.gpu_nodes.cpus} CPUs per node)",
        )

    def scaling_overrides(self) -> list[str]:
        """The preset's scaling as `--set` items, so an explicit --set given later still wins."""
        scaling = {"accelerator_type": self.accelerator_type, **self.scaling}
        return [f"scaling.{k}={_yaml_scalar(v)}" for k, v in scaling.items()]


DOCKERFILE = "kube/image/Dockerfile"  # relative to the repository root


@dataclass(frozen=True, kw_only=True)
class Versions:
    """`ray_configs/versions.yaml`: what the image holds and the tag the manifests pull."""

    ray_version: str
    raydiology_version: str
    python_version: str = "3.11"
    cuda_version: str = "12.8"
    cuda_arch_list: str = "8.0"  # TORCH_CUDA_ARCH_LIST for the image's CUDA builds (A100/A800)
    image: str
    workdir: str = "/opt/raydiology"

    @property
    def flavor(self) -> str:
        """The Python/CUDA part of rayproject/ray's tags, e.g. 'py311-cu128'."""
        return f"py{self.python_version.replace('.', '')}-cu{self.cuda_version.replace('.', '')}"

    @property
    def base_image(self) -> str:
        """The rayproject/ray image the Dockerfile builds FROM (a tag Ray publishes per release)."""
        return f"rayproject/ray:{self.ray_version}-{self.flavor}"

    @property
    def image_tag(self) -> str:
        """The tag `image` must carry: what is in it, so two builds never share a tag."""
        return f"{self.raydiology_version}-ray{self.ray_version}-{self.flavor}"

    def build_args(self) -> dict[str, str]:
        """`--build-arg`s for kube/image/Dockerfile (its ARG defaults repeat these)."""
        return {
            "BASE_IMAGE": self.base_image,
            "RAY_VERSION": self.ray_version,
            "PYTHON_VERSION": self.python_version,
            "CUDA_VERSION": self.cuda_version,
            "CUDA_ARCH_LIST": self.cuda_arch_list,
            "RAYDIOLOGY_VERSION": self.raydiology_version,
            "WORKDIR": self.workdir,
        }


def docker_build_command(versions: Versions | None = None) -> list[str]:
    """`docker build` arguments (without `docker`) for the image versions.yaml names, run from
    the repository root."""
    versions = versions or load_versions()
    command = ["build", "--file", DOCKERFILE]
    for name, value in versions.build_args().items():
        command += ["--build-arg", f"{name}={value}"]
    return [*command, "--tag", versions.image, "."]


def ray_configs_dir() -> Path:
    """`$RAYDIOLOGY_RAY_CONFIGS`, else ./ray_configs, else the repository's (editable installs,
    and the image, which holds the repository in its workdir)."""
    env = os.environ.get("RAYDIOLOGY_RAY_CONFIGS")
    candidates = [Path(env)] if env else []
    candidates += [Path.cwd() / "ray_configs", Path(__file__).resolve().parents[3] / "ray_configs"]
    for folder in candidates:
        if (folder / "versions.yaml").is_file():
            return folder
    raise ConfigError("--cluster", None, f"a ray_configs/ folder with versions.yaml ({candidates})")


def preset_names() -> list[str]:
    return sorted(p.stem for p in ray_configs_dir().glob("*.yaml") if p.stem != "versions")


def load_preset(name_or_path: str | Path) -> ClusterPreset:
    """A preset by name (`a800`) or by the path of its YAML file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = ray_configs_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError("--cluster", str(name_or_path), f"one of {preset_names()}")
    raw = yaml.safe_load(path.read_text())
    return from_dict(ClusterPreset, raw, "")


def load_versions(folder: Path | None = None) -> Versions:
    raw = yaml.safe_load(((folder or ray_configs_dir()) / "versions.yaml").read_text())
    return Versions(**{k: str(v) for k, v in raw.items()})


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


_UNITS = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "K": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
}


def _bytes(quantity: str) -> int:
    """Bytes in a Kubernetes quantity ('64Gi' -> 68719476736); 0 when it is not one."""
    text = str(quantity).strip()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            number = text[: -len(unit)]
            return int(float(number) * _UNITS[unit]) if _is_number(number) else 0
    return int(float(text)) if _is_number(text) else 0


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
