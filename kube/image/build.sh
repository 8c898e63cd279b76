#!/usr/bin/env bash
# Build the cluster image that ray_configs/versions.yaml names, with the build args it pins;
# `--push` pushes it afterwards. Works from any folder of a checkout; needs Python with PyYAML
# (raydiology's venv has it). DOCKER=podman (or another docker-compatible CLI) also works.
set -euo pipefail
cd "$(dirname "$0")/../.."

lines=$(PYTHONPATH="platform${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python3}" -c '
from raydiology.cluster.presets import docker_build_command, load_versions
print(load_versions().image)
print(*docker_build_command(), sep="\n")
')
mapfile -t args <<<"$lines"
image=${args[0]}
docker=${DOCKER:-docker}

echo "building $image" >&2
"$docker" "${args[@]:1}"
if [[ "${1:-}" == "--push" ]]; then
  "$docker" push "$image"
fi
