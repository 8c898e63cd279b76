"""Collectives on the group's device, and no collective or host sync per micro-batch.

GPU workers get an NCCL group, which takes only CUDA tensors: every collective raydiology
issues goes through `raydiology.train.collectives`, which puts tensors on the group's device.
The run test records every torch.distributed call made during a real 2-worker Ray Train run.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import socket
from pathlib import Path

import pytest
import torch

from raydiology.config import load_experiment
from raydiology.train import collectives

REPO = Path(__file__).resolve().parents[1]
RECORDED = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "gather",
    "scatter", "broadcast_object_list", "gather_object", "all_gather_object", "barrier",
)  # fmt: skip


def test_nccl_groups_take_the_current_cuda_device_others_the_cpu(monkeypatch):
    assert collectives.device_for_backend("gloo") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collectives.device_for_backend("nccl") == torch.device("cuda", 3)
    assert collectives.device_for_backend("NCCL") == torch.device("cuda", 3)


def test_outside_a_process_group_each_collective_is_the_single_rank_answer():
    t = torch.tensor([2.0, 3.0])
    assert collectives.all_reduce_(t, "max") is t and t.tolist() == [2.0, 3.0]
    assert collectives.broadcast_object({"a": 1}) == {"a": 1}
    assert collectives.gather_objects("x") == ["x"]
    assert list(collectives.in_step(iter(range(5)), lookahead=2)) == [0, 1, 2, 3, 4]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _in_step_worker(rank: int, port: int, counts: list[int], out) -> None:
    import torch.distributed as dist

    calls = []
    original = dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        dist.all_reduce = counting
        got = list(collectives.in_step(iter(range(counts[rank])), lookahead=4))
        out.put((rank, got, len(calls)))
    finally:
        dist.all_reduce = original
        dist.destroy_process_group()


def test_ranks_stop_together_with_one_collective_per_lookahead():
    context = mp.get_context("fork")
    out, port = context.Queue(), _free_port()
    counts = [10, 7]  # rank 1 runs short in its second window
    processes = [
        context.Process(target=_in_step_worker, args=(rank, port, counts, out)) for rank in (0, 1)
    ]
    for p in processes:
        p.start()
    results = sorted(out.get(timeout=120) for _ in processes)
    for p in processes:
        p.join(timeout=30)
        assert p.exitcode == 0
    for _, got, calls in results:
        assert got == list(range(7))  # both ranks take the 7 that rank 1 has
        assert calls == 2  # windows [0, 4) and [4, 8): not one per item


def test_window_keeps_sums_on_the_device_until_the_report(monkeypatch):
    from raydiology.train.loop import _Window

    window = _Window()
    outs = [{"loss": torch.tensor(float(i)), "acc": torch.tensor(0.5)} for i in range(4)]

    def no_sync(*_):
        raise AssertionError("host sync inside the step loop")

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "item", no_sync)
        m.setattr(torch.Tensor, "__float__", no_sync)
        m.setattr(torch.Tensor, "tolist", no_sync)
        for out in outs:
            window.add(out, images=2)
    assert window.count == 4 and window.images == 8
    assert float(window.sums["loss"]) == 6.0


def _recording_loop(config: dict) -> None:
    """The real worker loop with every torch.distributed call recorded (caller, devices)."""
    import sys

    import ray.train
    import torch.distributed as dist

    from raydiology.train import collectives as ours
    from raydiology.train.loop import train_loop_per_worker

    records: list[dict] = []
    originals = {name: getattr(dist, name) for name in RECORDED}

    def recorder(name):
        def call(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "raydiology" in caller:
                tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
                for a in (*args, *kwargs.values()):
                    if isinstance(a, list):
                        tensors += [t for t in a if isinstance(t, torch.Tensor)]
                records.append(
                    {
                        "fn": name,
                        "caller": caller,
                        "devices": sorted({str(t.device) for t in tensors}),
                        "group_device": str(ours.group_device()),
                    }
                )
            return originals[name](*args, **kwargs)

        return call

    for name in RECORDED:
        setattr(dist, name, recorder(name))
    try:
        train_loop_per_worker(config)
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
        rank = ray.train.get_context().get_world_rank()
        Path(config["record_dir"], f"rank-{rank}.json").write_text(json.dumps(records))


@pytest.mark.ray
def test_every_collective_of_a_real_run_goes_through_one_module_on_the_group_device(
    ray_cluster, tmp_path
):
    import sys

    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from rich.console import Console

    from raydiology.data.pipeline import build_dataset
    from raydiology.train.launch import resolve_corpus

    steps, sync_every, log_every = 8, 3, 4
    exp = load_experiment(
        REPO / "experiments/hd_mae_cam.yaml",
        profile="smoke",
        overrides=[
            f"output.dir={tmp_path}", f"train.max_steps={steps}", f"train.sync_every={sync_every}",
            f"train.log_every={log_every}", f"train.checkpoint_every={steps}",
            "train.zero_stage=1", "data.resolution=64", "data.phantom.size=64",
        ],
    )  # fmt: skip
    corpus = resolve_corpus(exp, console=Console(quiet=True))
    records = tmp_path / "records"
    records.mkdir()
    # the workers cannot import this test file: ship `_recording_loop` by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    trainer = TorchTrainer(
        _recording_loop,
        train_loop_config={"experiment": exp.to_dict(), "record_dir": str(records)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="collectives", storage_path=str(tmp_path / "ray")),
        datasets={"train": build_dataset(exp.data, corpus)},
    )
    result = trainer.fit()
    assert result.error is None and result.metrics["step"] == steps

    for rank in (0, 1):
        calls = json.loads((records / f"rank-{rank}.json").read_text())
        assert calls, "the loop issued no collective at all"
        for call in calls:
            assert call["caller"].endswith("raydiology/train/collectives.py"), call
            assert call["devices"] in ([], [call["group_device"]]), call
        # ranks agree on the epoch once per `sync_every` micro-batches (plus the loss
        # all-reduce at each of the steps / log_every reports), not once per micro-batch
        agreements = -(-steps // sync_every)
        assert len(calls) <= agreements + steps // log_every, calls
