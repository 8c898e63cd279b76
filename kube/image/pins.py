"""Print pyproject.toml's requirement for each named distribution, one a line.

The image installs PyTorch and the CUDA-built packages in separate steps before the project
itself (see Dockerfile); taking their version ranges from pyproject.toml keeps one list of
pins. Usage: python kube/image/pins.py torch torchvision deepspeed mamba-ssm
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(pyproject: Path = PYPROJECT) -> dict[str, str]:
    """Every requirement of the project and its extras, by canonical distribution name."""
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        lines += extra
    found: dict[str, str] = {}
    for line in lines:
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
        if match:
            found[canonical(match.group(1))] = line.strip()
    return found


def main(names: list[str]) -> int:
    known = requirements()
    missing = [n for n in names if canonical(n) not in known]
    if missing or not names:
        print(f"not in {PYPROJECT.name}: {missing or 'no names given'}", file=sys.stderr)
        return 1
    for name in names:
        print(known[canonical(name)])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
