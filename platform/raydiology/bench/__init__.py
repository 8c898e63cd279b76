"""Benchmarks: each prints JSON with its baselines measured in the same run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def publish(report: dict[str, Any], table: str, json_path: Path | None) -> None:
    """Print a benchmark's table, and write its full report as JSON where asked."""
    print(table)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
