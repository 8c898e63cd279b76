"""The chunked selective scan against the reference (values, gradients, dtypes, saved memory),
the scan option of the Mamba mixers and Vision Mamba configs, activation checkpointing of
Vision Mamba blocks, and the scan benchmark at toy sizes. CPU only, seconds each."""

from __future__ import annotations

import json
import types

import pytest
import torch

import raydiology.models.mamba as mamba_module
from raydiology.bench.scan import main as bench_main
from raydiology.bench.scan import run_scan_benchmark
from raydiology.config_base import ConfigError, from_dict
from raydiology.models.mamba import (
    SCAN_IMPLS,
    Mamba,
    Mamba4D,
    chunked_selective_scan,
    selective_scan,
)
from raydiology.models.vision_mamba import (
    VisionMambaARGConfig,
    VisionMambaConfig,
    build_vision_mamba,
    build_vision_mamba_arg,
)

SCAN_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


@pytest.fixture(autouse=True)
def one_thread():
    """The reference scan is a loop of small ops: on a shared machine, intra-op threads
    mostly wait for each other (see tests/test_vision_mamba.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def scan_inputs(*, batch=2, channels=6, length=33, state=4, optional=True, seed=0):
    """Leaf tensors requiring grad; D, z and delta_bias only with `optional`. Δ around
    softplus(-1.5) so that decays over a chunk span (0, 1) rather than all vanish."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    x = {
        "u": randn(batch, channels, length),
        "delta": randn(batch, channels, length) * 0.5 - 1.5,
        "A": -torch.rand(channels, state, generator=g) * 4 - 0.1,
        "B": randn(batch, state, length),
        "C": randn(batch, state, length),
    }
    if optional:
        x |= {"D": randn(channels), "z": randn(batch, channels, length)}
        x["delta_bias"] = randn(channels) * 0.1
    return {k: v.requires_grad_() for k, v in x.items()}


def run(scan, inputs, *, seed=1, **kwargs):
    """Output and the gradients of every input for a fixed random cotangent."""
    inputs = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    y = scan(**inputs, **kwargs)
    cotangent = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    y.backward(cotangent.to(y.dtype))
    return y.detach(), {k: v.grad for k, v in inputs.items()}


# ----------------------------------------------------------------------------- the scan


@pytest.mark.parametrize(
    ("length", "chunk"), [(1, 4), (7, 4), (16, 4), (33, 8), (50, 16), (21, 64), (9, 1)]
)
@pytest.mark.parametrize("optional", [True, False], ids=["D-z-bias", "bare"])
def test_chunked_equals_reference_in_float32(length, chunk, optional) -> None:
    x = scan_inputs(length=length, optional=optional)
    softplus = optional  # the bare case feeds Δ > 0 as it is
    if not optional:
        x["delta"] = torch.nn.functional.softplus(x["delta"]).detach().requires_grad_()
    y_ref, grads_ref = run(selective_scan, x, delta_softplus=softplus)
    y, grads = run(chunked_selective_scan, x, delta_softplus=softplus, chunk=chunk)
    assert y.dtype == torch.float32 and y.shape == x["u"].shape
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert set(grads) == set(grads_ref)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], rtol=1e-5, atol=1e-5, msg=name)


def test_chunked_in_bfloat16_within_bfloat16_tolerance() -> None:
    x32 = scan_inputs(length=40, channels=8, state=16)
    activations = ("u", "delta", "B", "C", "z")  # bf16 like the mixer's; A, D, bias float32
    x16 = {k: v.detach().to(torch.bfloat16) if k in activations else v for k, v in x32.items()}
    # the reference on the same (rounded) inputs, in float32
    x_rounded = {k: v.detach().float() for k, v in x16.items()}
    y_ref, grads_ref = run(selective_scan, x_rounded, delta_softplus=True)
    y, grads = run(chunked_selective_scan, x16, delta_softplus=True)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref, rtol=1.6e-2, atol=1e-2)
    for name, grad in grads.items():
        assert grad.dtype == x16[name].dtype, name
        scale = grads_ref[name].abs().max()
        torch.testing.assert_close(
            grad.float(), grads_ref[name], rtol=1.6e-2, atol=1e-2 * scale, msg=name
        )


def test_chunked_equals_mamba_ssm_reference() -> None:
    ops = pytest.importorskip(
        "mamba_ssm.ops.selective_scan_interface",
        reason="mamba-ssm (the `cuda` extra) is not installed here; its selective_scan_ref "
        "is the reference when it is",
    )
    x = {k: v.detach() for k, v in scan_inputs(length=37, state=16).items()}
    expected = ops.selective_scan_ref(**x, delta_softplus=True)
    torch.testing.assert_close(chunked_selective_scan(**x, delta_softplus=True), expected)


def saved_bytes(scan, inputs, **kwargs) -> int:
    """Bytes of the distinct storages autograd keeps for backward after one forward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    inputs = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        scan(**inputs, **kwargs)
    given = {v.untyped_storage().data_ptr() for v in inputs.values()}
    return sum(n for ptr, n in storages.items() if ptr not in given)


def test_chunked_saves_far_less_for_backward_than_reference() -> None:
    x = scan_inputs(batch=2, channels=16, length=256, state=16)
    reference = saved_bytes(selective_scan, x, delta_softplus=True)
    chunked = saved_bytes(chunked_selective_scan, x, delta_softplus=True)
    # the reference keeps every step's decay, input and state [B, Di, L, N]; the chunked
    # scan a few [B, Di, L] tensors, whatever L
    b, di, length, n = 2, 16, 256, 16
    assert reference >= 2 * b * di * length * n * 4
    assert chunked <= 8 * b * di * length * 4, (chunked, reference)


# ----------------------------------------------------------------------------- dispatch


def test_mixer_scan_option_picks_the_scan(monkeypatch) -> None:
    on_cpu = torch.zeros(1)
    on_gpu = types.SimpleNamespace(is_cuda=True)  # _scan_fn only asks where the input is
    fused = object()

    def pick(impl: str, x, *, kernels: bool = True, installed: bool = True):
        monkeypatch.setattr(
            mamba_module, "cuda_selective_scan", lambda: fused if installed else None
        )
        return Mamba(8, scan_impl=impl, use_cuda_kernels=kernels)._scan_fn(x)

    assert pick("auto", on_cpu) is selective_scan
    assert pick("cuda", on_cpu) is selective_scan  # the kernel cannot run on CPU
    assert pick("chunked", on_cpu) is chunked_selective_scan
    assert pick("reference", on_gpu) is selective_scan
    assert pick("auto", on_gpu) is fused
    assert pick("auto", on_gpu, installed=False) is chunked_selective_scan
    assert pick("auto", on_gpu, kernels=False) is chunked_selective_scan
    assert pick("cuda", on_gpu) is fused
    with pytest.raises(RuntimeError, match="mamba-ssm"):
        pick("cuda", on_gpu, installed=False)
    with pytest.raises(ValueError, match="scan_impl"):
        Mamba(8, scan_impl="fast")


@pytest.mark.parametrize("mixer_cls", [Mamba, Mamba4D])
def test_chunked_mixer_gives_the_reference_output(mixer_cls) -> None:
    torch.manual_seed(0)
    reference = mixer_cls(16, scan_impl="reference")
    chunked = mixer_cls(16, scan_impl="chunked")
    chunked.load_state_dict(reference.state_dict())
    x = torch.randn(2, 21, 16)
    kwargs = {"column_order": torch.randperm(21)} if mixer_cls is Mamba4D else {}
    torch.testing.assert_close(chunked(x, **kwargs), reference(x, **kwargs))


def test_chunked_mixer_under_bfloat16_autocast() -> None:
    torch.manual_seed(0)
    reference = Mamba(16, scan_impl="reference")
    chunked = Mamba(16, scan_impl="chunked")
    chunked.load_state_dict(reference.state_dict())
    x = torch.randn(2, 21, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, y = reference(x), chunked(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=1.6e-2, atol=1e-2)
    y.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in chunked.parameters())


@pytest.mark.parametrize("config_cls", [VisionMambaARGConfig, VisionMambaConfig])
def test_scan_config_option_is_validated_and_reaches_the_mixers(config_cls) -> None:
    for bad in ("fast", "Chunked"):
        with pytest.raises(ConfigError) as err:
            from_dict(config_cls, {"flavor": "tiny", "scan": bad}, "model")
        assert err.value.key == "model.scan"
        assert all(impl in str(err.value) for impl in SCAN_IMPLS)
    with pytest.raises(ConfigError) as err:
        from_dict(config_cls, {"scan": "cuda", "use_cuda_kernels": False}, "model")
    assert err.value.key == "model.scan"
    cfg = from_dict(config_cls, {"flavor": "tiny", "scan": "chunked"}, "model")
    build = build_vision_mamba_arg if config_cls is VisionMambaARGConfig else build_vision_mamba
    model = build(cfg, image_size=128, in_chans=1)
    mixers = [m for m in model.modules() if isinstance(m, Mamba)]
    assert mixers and all(m.scan_impl == "chunked" for m in mixers)


# ----------------------------------------------------------------------------- checkpointing


def loss_and_grads(name: str, **cfg):
    """A tiny model's loss on fixed images and the gradients of its parameters."""
    torch.manual_seed(0)
    if name == "vision_mamba_arg":
        config = from_dict(VisionMambaARGConfig, {"flavor": "tiny", **cfg}, "model")
        model = build_vision_mamba_arg(config, image_size=128, in_chans=1)
        images = torch.randn(2, 1, 128, 128, generator=torch.Generator().manual_seed(1))
        loss = model(images)[0]
    else:
        config = from_dict(VisionMambaConfig, {"flavor": "tiny", **cfg}, "model")
        model = build_vision_mamba(config, image_size=32, in_chans=1)
        images = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
        loss = model(images).square().mean()
    loss.backward()
    return model, loss.detach(), {k: p.grad for k, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("name", "scan"), [("vision_mamba_arg", "auto"), ("vision_mamba", "chunked")]
)
def test_grad_checkpointing_gives_the_same_loss_and_gradients(name, scan) -> None:
    _, loss, grads = loss_and_grads(name, scan=scan)
    model, loss_ckpt, grads_ckpt = loss_and_grads(name, scan=scan, grad_checkpointing=True)
    blocks = [m for m in model.modules() if hasattr(m, "grad_checkpointing")]
    assert blocks and all(b.grad_checkpointing for b in blocks)
    torch.testing.assert_close(loss_ckpt, loss)
    assert set(grads_ckpt) == set(grads)
    for k, g in grads.items():
        assert g is not None, k
        torch.testing.assert_close(grads_ckpt[k], g, msg=k)


# ----------------------------------------------------------------------------- benchmark


def test_scan_benchmark_runs_on_cpu_and_writes_json(tmp_path, capsys) -> None:
    report = run_scan_benchmark(batch=1, length=20, dim=8, state=4, repeats=2, compile=False)
    assert list(report) == ["config", "results", "skipped"]
    assert list(report["results"]) == ["reference", "chunked"]
    assert report["results"]["reference"]["speedup"] == 1.0
    assert report["results"]["chunked"]["max_abs_diff"] < 1e-4
    assert set(report["skipped"]) == {"chunked+compile", "mamba-ssm"}

    out = tmp_path / "scan.json"
    argv = ["--batch", "1", "--length", "9", "--dim", "4", "--state", "2", "--repeats", "1"]
    assert bench_main([*argv, "--dtype", "bf16", "--chunk", "4", "--json", str(out)]) == 0
    assert "chunked" in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert written["config"]["dtype"] == "bf16" and written["config"]["chunk"] == 4
    for row in written["results"].values():
        assert set(row) >= {"median_s", "times_s", "speedup", "peak_memory_bytes", "max_abs_diff"}
        assert row["peak_memory_bytes"] is None  # CPU: time only
