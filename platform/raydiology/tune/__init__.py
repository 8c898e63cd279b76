"""Hyperparameter sweeps on Ray Tune: `raydiology sweep SWEEP.yaml`.

`spec` reads the sweep file and validates every trial experiment before Ray starts;
`runner` runs a Tuner over a driver function that launches one TorchTrainer per trial (Ray
Train V2), with ASHA early stopping, retries and resume; `results` writes the table, the best
config and the plots.
"""

from raydiology.tune.spec import Plan, SweepConfig, load_sweep, make_plan

__all__ = ["Plan", "SweepConfig", "load_sweep", "make_plan"]
