"""KubeRay manifests: the checked-in RayClusters and rendered RayJobs validate against the CRD
schemas (unknown fields included), stay in sync with their presets, and pin one image."""

from __future__ import annotations

import copy
import importlib.metadata
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from raydiology.cli import app
from raydiology.cluster import manifests
from raydiology.cluster.metrics import METRIC_NAMES
from raydiology.cluster.presets import (
    DEFAULT_RDMA_RESOURCE,
    NCCL_DEFAULTS,
    load_preset,
    load_versions,
    preset_names,
)
from raydiology.cluster.workload import load_workload
from raydiology.config import load_experiment
from raydiology.config_base import ConfigError

REPO = Path(__file__).resolve().parents[1]
KUBE = REPO / "kube"
EXPERIMENT = REPO / "experiments" / "hd_mae_cam.yaml"
CLUSTERS = ["a800", "a100"]


@pytest.fixture(scope="module")
def crds() -> Path:
    folder = manifests.default_crd_dir()
    if not (folder / manifests.CRD_FILES["RayCluster"]).is_file():
        pytest.skip(f"KubeRay CRDs not found at {folder} (../shared is absent)")
    return folder


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def render_job(cluster: str, *extra: str) -> dict:
    return yaml.safe_load(
        cli("kube", "render", str(EXPERIMENT), "--cluster", cluster, "--root", str(REPO), *extra)
    )


def test_presets_are_the_two_clusters():
    assert preset_names() == sorted(CLUSTERS)


@pytest.mark.parametrize("path", sorted(KUBE.glob("*.yaml")), ids=lambda p: p.name)
def test_every_kube_manifest_validates(path, crds):
    assert manifests.validate_file(path, crds) >= 1


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_checked_in_raycluster_is_what_the_preset_renders(cluster):
    rendered = cli("kube", "cluster", "--cluster", cluster)
    assert (KUBE / f"raycluster-{cluster}.yaml").read_text() == rendered, (
        f"kube/raycluster-{cluster}.yaml is stale: "
        f"raydiology kube cluster --cluster {cluster} --out kube/raycluster-{cluster}.yaml"
    )


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_raycluster_shape(cluster):
    doc = yaml.safe_load((KUBE / f"raycluster-{cluster}.yaml").read_text())
    spec = doc["spec"]
    preset = load_preset(cluster)
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["gcsFaultToleranceOptions"]["redisAddress"] == preset.redis.address
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    head_limits = head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits
    gpu, cpu = spec["workerGroupSpecs"]
    pod = gpu["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": preset.gpu_product}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    accelerator = cluster.upper()
    assert gpu["labels"] == {"ray.io/accelerator-type": accelerator}
    assert gpu["resources"] == {f"accelerator_type:{accelerator}": "1"}
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": preset.gpu_nodes.shm}
    # multi-node NCCL: the RDMA device, NCCL's variables, and the right to pin memory
    container = pod["containers"][0]
    network = preset.network
    assert network.rdma_resource == DEFAULT_RDMA_RESOURCE
    for amounts in container["resources"].values():
        assert amounts[network.rdma_resource] == "1"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert {k: v for k, v in env.items() if k.startswith("NCCL_")} == NCCL_DEFAULTS
    assert env["NCCL_DEBUG"] == "WARN"
    assert container["securityContext"] == {"capabilities": {"add": ["IPC_LOCK"]}}
    # the CPU-only group decodes for Ray Data: no GPU, no GPU node selector, no RDMA or NCCL
    cpu_pod = cpu["template"]["spec"]
    assert "nvidia.com/gpu" not in cpu_pod["containers"][0]["resources"]["limits"]
    assert "nodeSelector" not in cpu_pod
    for other in (cpu_pod, head["template"]["spec"]):
        body = other["containers"][0]
        assert network.rdma_resource not in body["resources"]["limits"]
        assert not any(e["name"].startswith("NCCL_") for e in body["env"])
        assert "securityContext" not in body


def _preset_with(tmp_path, value, section="network"):
    """The a800 preset with `section` replaced by `value` (None: left out)."""
    raw = yaml.safe_load((REPO / "ray_configs" / "a800.yaml").read_text())
    if value is None:
        raw.pop(section)
    else:
        raw[section] = value
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_preset(path)


def _gpu_container(doc):
    return doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


def test_a_site_overrides_the_rdma_resource_and_nccl_settings(tmp_path, crds):
    preset = _preset_with(
        tmp_path,
        {
            "rdma_resource": "nvidia.com/hostdev",
            "rdma_devices": 2,
            "attachments": "ray/roce-net",
            "env": {"NCCL_SOCKET_IFNAME": "net1", "NCCL_IB_GID_INDEX": None, "NCCL_IB_TIMEOUT": 22},
        },
    )
    doc = manifests.raycluster(preset, load_versions())
    manifests.validate(doc, crds, source="site override")
    container = _gpu_container(doc)
    limits = container["resources"]["limits"]
    assert limits["nvidia.com/hostdev"] == "2" and DEFAULT_RDMA_RESOURCE not in limits
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["NCCL_SOCKET_IFNAME"] == "net1"  # replaced
    assert "NCCL_IB_GID_INDEX" not in env  # null: NCCL chooses
    assert env["NCCL_IB_TIMEOUT"] == "22"  # added
    assert env["NCCL_IB_HCA"] == NCCL_DEFAULTS["NCCL_IB_HCA"]  # not named: the default
    metadata = doc["spec"]["workerGroupSpecs"][0]["template"]["metadata"]
    assert metadata["annotations"] == {manifests.MULTUS_ANNOTATION: "ray/roce-net"}
    assert "annotations" not in doc["spec"]["workerGroupSpecs"][1]["template"]["metadata"]


def test_a_site_without_rdma_and_a_preset_without_network(tmp_path, crds):
    doc = manifests.raycluster(_preset_with(tmp_path, {"rdma_resource": None}), load_versions())
    manifests.validate(doc, crds)
    container = _gpu_container(doc)
    assert not any("/" in k and k != "nvidia.com/gpu" for k in container["resources"]["limits"])
    assert "securityContext" not in container  # no RDMA, no memory pinning
    assert {e["name"] for e in container["env"]} >= set(NCCL_DEFAULTS)  # TCP still uses NCCL_*
    # a preset that says nothing about the network gets the documented defaults
    defaults = _preset_with(tmp_path, None).network
    assert defaults.rdma_resource == DEFAULT_RDMA_RESOURCE and defaults.nccl_env() == NCCL_DEFAULTS


@pytest.mark.parametrize(
    "network, key",
    [
        ({"rdma_resource": "hca"}, "network.rdma_resource"),
        ({"rdma_devices": 0}, "network.rdma_devices"),
        ({"env": {"NCCL-DEBUG": "INFO"}}, "network.env.NCCL-DEBUG"),
        ({"env": {"NCCL_IB_HCA": ["mlx5_0"]}}, "network.env.NCCL_IB_HCA"),
        ({"rdma_resorce": "rdma/hca"}, "network.rdma_resorce"),
    ],
)
def test_bad_network_settings_name_the_key(tmp_path, network, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _preset_with(tmp_path, network)


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_checked_in_pod_monitors_are_what_the_preset_renders(cluster):
    path = KUBE / "monitoring" / f"podmonitors-{cluster}.yaml"
    assert path.read_text() == cli("kube", "monitors", "--cluster", cluster), (
        f"{path.relative_to(REPO)} is stale: "
        f"raydiology kube monitors --cluster {cluster} --out {path.relative_to(REPO)}"
    )


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_pod_monitors_scrape_every_metrics_port_of_every_cluster_of_the_preset(cluster):
    from ray.autoscaler._private.constants import AUTOSCALER_METRIC_PORT
    from ray.dashboard.consts import DASHBOARD_METRIC_PORT

    preset = load_preset(cluster)
    monitors = list(
        yaml.safe_load_all((KUBE / "monitoring" / f"podmonitors-{cluster}.yaml").read_text())
    )
    by_type = {m["spec"]["selector"]["matchLabels"]["ray.io/node-type"]: m for m in monitors}
    assert [m["kind"] for m in monitors] == ["PodMonitor", "PodMonitor"]
    assert sorted(by_type) == ["head", "worker"]
    # the long-running cluster and the cluster each RayJob brings up
    for spec in (
        yaml.safe_load((KUBE / f"raycluster-{cluster}.yaml").read_text())["spec"],
        render_job(cluster)["spec"]["rayClusterSpec"],
    ):
        pods = {"head": [spec["headGroupSpec"]["template"]],
                "worker": [group["template"] for group in spec["workerGroupSpecs"]]}  # fmt: skip
        for node_type, templates in pods.items():
            monitor = by_type[node_type]
            assert monitor["metadata"]["labels"]["release"] == preset.monitoring.release
            assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ray"]}
            for pod in templates:
                # KubeRay adds ray.io/node-type; the rest of the selector is on our template
                labels = {**pod["metadata"]["labels"], "ray.io/node-type": node_type}
                assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
                ports = {
                    p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]
                }
                for endpoint in monitor["spec"]["podMetricsEndpoints"]:
                    assert endpoint["port"] in ports, (node_type, endpoint["port"])
                    assert endpoint["relabelings"] == [{
                        "action": "replace",
                        "sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"],
                        "targetLabel": "ray_io_cluster",
                    }]  # fmt: skip
        head_ports = {p["name"]: p["containerPort"]
                      for p in pods["head"][0]["spec"]["containers"][0]["ports"]}  # fmt: skip
        assert head_ports["as-metrics"] == AUTOSCALER_METRIC_PORT  # Ray's own defaults
        assert head_ports["dash-metrics"] == DASHBOARD_METRIC_PORT
    assert [e["port"] for e in by_type["head"]["spec"]["podMetricsEndpoints"]] == [
        "metrics", "as-metrics", "dash-metrics"]  # fmt: skip


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_the_head_tells_its_dashboard_where_prometheus_and_grafana_are(cluster):
    spec = yaml.safe_load((KUBE / f"raycluster-{cluster}.yaml").read_text())["spec"]
    env = lambda template: {e["name"]: e["value"] for e in template["spec"]["containers"][0]["env"]}  # noqa: E731
    head = env(spec["headGroupSpec"]["template"])
    monitoring = load_preset(cluster).monitoring
    assert head["RAY_PROMETHEUS_HOST"] == monitoring.prometheus_host
    assert head["RAY_GRAFANA_HOST"] == monitoring.grafana_host
    assert head["RAY_GRAFANA_IFRAME_HOST"] == monitoring.grafana_iframe_host
    for group in spec["workerGroupSpecs"]:  # only the head's dashboard reads them
        assert not any(name.startswith("RAY_GRAFANA") for name in env(group["template"]))


def test_a_site_without_grafana_and_bad_monitoring_settings(tmp_path, crds):
    preset = _preset_with(
        tmp_path, {"grafana_host": None, "grafana_iframe_host": None}, section="monitoring"
    )
    doc = manifests.raycluster(preset, load_versions())
    manifests.validate(doc, crds)
    head = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    names = {e["name"] for e in head["env"]}
    assert "RAY_PROMETHEUS_HOST" in names and not any("GRAFANA" in n for n in names)
    with pytest.raises(ConfigError, match=r"monitoring\.prometheus_host"):
        _preset_with(tmp_path, {"prometheus_host": "prometheus:9090"}, section="monitoring")
    with pytest.raises(ConfigError, match=r"monitoring\.grafana"):
        _preset_with(tmp_path, {"grafana": "http://g"}, section="monitoring")


def test_image_and_versions_pinned_in_one_place():
    versions = load_versions()
    import ray

    assert versions.ray_version == ray.__version__
    assert versions.raydiology_version == importlib.metadata.version("raydiology")
    for cluster in CLUSTERS:
        assert load_preset(cluster).image is None  # no preset overrides the pinned image
        text = (KUBE / f"raycluster-{cluster}.yaml").read_text()
        assert text.count(f"image: {versions.image}") == 3  # head, GPU and CPU groups
        assert f"rayVersion: {versions.ray_version}" in text


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_rendered_rayjob_validates_and_runs_the_platform_cli(cluster, crds):
    doc = render_job(cluster)
    manifests.validate(doc, crds, source=f"RayJob for {cluster}")
    spec = doc["spec"]
    assert doc["metadata"]["name"] == f"hd-mae-cam-{cluster}"
    assert spec["entrypoint"] == (
        "cd /opt/raydiology && raydiology run experiments/hd_mae_cam.yaml "
        f"--cluster {cluster} --set output.dir=/mnt/runs --address auto"
    )
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
    assert spec["backoffLimit"] == 2
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    raycluster = yaml.safe_load((KUBE / f"raycluster-{cluster}.yaml").read_text())
    assert spec["rayClusterSpec"] == raycluster["spec"]  # one template for both


def test_rendered_rayjob_for_an_existing_cluster_and_overrides(crds):
    doc = render_job("a800", "--existing", "--profile", "smoke", "--set", "train.max_steps=7")
    manifests.validate(doc, crds)
    assert doc["spec"]["clusterSelector"] == {"ray.io/cluster": "raydiology-a800"}
    assert "rayClusterSpec" not in doc["spec"]
    assert "--profile smoke" in doc["spec"]["entrypoint"]
    assert "--set train.max_steps=7" in doc["spec"]["entrypoint"]


def test_kube_validate_command(crds, tmp_path):
    assert "ok" in cli("kube", "validate", *map(str, KUBE.glob("*.yaml")), "--crds", str(crds))
    doc = yaml.safe_load((KUBE / "raycluster-a800.yaml").read_text())
    doc["spec"]["headGroupSpec"]["rayStartParam"] = doc["spec"]["headGroupSpec"].pop(
        "rayStartParams"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    result = CliRunner().invoke(app, ["kube", "validate", str(bad), "--crds", str(crds)])
    assert result.exit_code == 1 and "rayStartParam" in result.output


@pytest.mark.parametrize(
    "where, typo",
    [
        (["spec", "workerGroupSpecs", 0], ("minReplicas", "minReplica")),
        (["spec"], ("enableInTreeAutoscaling", "enableIntreeAutoscaling")),
        (["spec", "authOptions"], ("mode", "mod")),
        (["spec", "workerGroupSpecs", 0, "template", "spec"], ("nodeSelector", "nodeSelecter")),
        (
            ["spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "resources"],
            ("limits", "limit"),
        ),
    ],
)
def test_a_typo_in_a_field_name_fails(crds, where, typo):
    doc = yaml.safe_load((KUBE / "raycluster-a800.yaml").read_text())
    manifests.validate(copy.deepcopy(doc), crds)  # the original is fine
    node = doc
    for key in where:
        node = node[key]
    right, wrong = typo
    node[wrong] = node.pop(right)
    with pytest.raises(manifests.ManifestError) as caught:
        manifests.validate(doc, crds)
    assert wrong in str(caught.value)


def test_a_wrong_value_fails(crds):
    doc = yaml.safe_load((KUBE / "raycluster-a800.yaml").read_text())
    doc["spec"]["authOptions"]["mode"] = "password"
    doc["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(manifests.ManifestError) as caught:
        manifests.validate(doc, crds)
    assert len(caught.value.errors) == 2


def test_strict_schema_leaves_preserve_unknown_fields_open():
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"x": {"type": "string"}}},
            "b": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "properties": {"y": {"type": "string"}},
            },
            "c": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }
    strict = manifests.strict_schema(schema)
    assert strict["additionalProperties"] is False
    assert strict["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in strict["properties"]["b"]
    assert strict["properties"]["c"]["additionalProperties"] == {"type": "string"}
    assert "additionalProperties" not in schema  # the input is left alone


def test_cluster_preset_overlays_scaling_and_set_still_wins():
    preset = load_preset("a800")
    exp = load_experiment(EXPERIMENT, profile="smoke", overrides=preset.scaling_overrides())
    assert exp.scaling.accelerator_type == "A800"
    assert (exp.scaling.num_workers, exp.scaling.use_gpu, exp.scaling.cpus_per_worker) == (
        8,
        True,
        8,
    )
    work = load_workload(
        EXPERIMENT, root=REPO, cluster="a100", sets=["scaling.num_workers=2"], profile="smoke"
    )
    assert work.args == [
        "run", "experiments/hd_mae_cam.yaml", "--profile", "smoke", "--cluster", "a100",
        "--set", "scaling.num_workers=2",
    ]  # fmt: skip


def test_bad_preset_names_the_key(tmp_path):
    raw = yaml.safe_load((REPO / "ray_configs" / "a800.yaml").read_text())
    raw["scaling"]["num_worker"] = 4
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"scaling\.num_worker"):
        load_preset(path)
    with pytest.raises(ConfigError, match="a800"):
        load_preset("h100")


def test_sweep_files_run_as_raydiology_sweep(crds):
    sweep = REPO / "experiments" / "sweeps" / "mask_ratio.yaml"
    work = load_workload(sweep, root=REPO, profile="smoke", cluster="a100")
    assert work.kind == "sweep" and work.name == "mask_ratio"
    # the preset says where trials run; the sweep's resources keep the workers per trial
    assert work.args == [
        "sweep", "experiments/sweeps/mask_ratio.yaml", "--profile", "smoke",
        "--set", "scaling.accelerator_type=A100", "--set", "scaling.use_gpu=true",
        "--set", "scaling.gpus_per_worker=1", "--set", "scaling.cpus_per_worker=8",
    ]  # fmt: skip
    doc = yaml.safe_load(
        cli("kube", "render", str(sweep), "--cluster", "a100", "--root", str(REPO))
    )
    manifests.validate(doc, crds)
    assert doc["metadata"]["name"] == "mask-ratio-a100"
    entrypoint = doc["spec"]["entrypoint"]
    assert " raydiology sweep experiments/sweeps/mask_ratio.yaml " in entrypoint
    # the job checks the sweep against the cluster grown to the preset's maximum (4 GPU nodes)
    assert "--out /mnt/runs/sweeps " in entrypoint and "--address auto" in entrypoint
    assert "--max-cluster CPU=" in entrypoint and ",GPU=32" in entrypoint, entrypoint


def test_experiment_outside_the_root_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="inside"):
        load_workload(EXPERIMENT, root=tmp_path)


def test_exposed_dashboard_requires_token_auth(monkeypatch):
    from rich.console import Console

    from raydiology.train.launch import connect_ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(RuntimeError, match="token authentication"):
        connect_ray(None, dashboard_host="0.0.0.0", console=Console())


def test_grafana_dashboard_plots_every_metric():
    dash = json.loads((KUBE / "grafana" / "raydiology-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for name in METRIC_NAMES:
        assert f"ray_{name}" in exprs, name
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"experiment", "run"} <= variables
