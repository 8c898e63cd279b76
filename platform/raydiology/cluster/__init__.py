"""Clusters: KubeRay manifests (presets, rendering, CRD validation), Ray job submission, and
the training loop's Prometheus metrics."""
