"""The Mamba mixer (selective state-space layer) for Vision Mamba, with no compiled dependency.

Parameter names follow `mamba_ssm.modules.mamba_simple.Mamba` (in_proj, conv1d, x_proj,
dt_proj, A_log, D, out_proj), so a checkpoint moves between the pure-PyTorch scans here and
the `mamba-ssm` CUDA kernels (the `cuda` extra). The import is lazy: nothing here needs
mamba-ssm to build or train on CPU.

Three implementations of one selective scan, picked per mixer by `scan_impl` (SCAN_IMPLS):
`selective_scan`, the step-by-step reference (stores every step's state for backward);
`chunked_selective_scan`, a chunked two-level scan, memory-lean in backward (the GPU path
when mamba-ssm is missing); mamba-ssm's fused `selective_scan_fn`.

`Mamba4D` is the bidirectional 4-direction variant used by MambaXray-VL stages 2-3 (rows and
columns, each forward and reverse); its branch parameters carry the names of the official
Vim/ARM "v3" mixer (conv1d_b, A_b_log, x_proj_c, D_c_b, ...).

Shapes: B batch, L sequence length, D model dim, Di inner dim (= expand·D), N state size,
R dt rank.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ScanFn = Callable[..., Tensor]

# "auto": mamba-ssm's kernel on CUDA inputs when it imports, else the chunked scan; the
# reference on CPU (its step loop is cheap there and it is the definition the others match).
SCAN_IMPLS = ("auto", "reference", "chunked", "cuda")
SCAN_CHUNK = 16  # steps per chunk: T + L/T sequential steps, fewest at T = sqrt(L)


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """The selective scan in PyTorch, with `mamba_ssm`'s `selective_scan_fn` signature.

    u, delta [B, Di, L]; A [Di, N]; B, C [B, N, L]; D [Di]; z [B, Di, L] -> y [B, Di, L]:
        h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t,   y_t = C_t · h_t + D u_t,   y *= silu(z).
    The discretisation is computed for all steps at once; only the recurrence itself loops
    over L, vectorised over batch, channels and state. Computed in float32, returned in
    u's dtype.
    """
    dtype = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    decay = torch.exp(delta.unsqueeze(-1) * A.float()[:, None, :])  # [B, Di, L, N]
    drive = (delta * u).unsqueeze(-1) * B.float().transpose(1, 2).unsqueeze(1)  # [B, Di, L, N]
    h = torch.zeros_like(drive[:, :, 0])  # [B, Di, N]
    outputs = []
    # unbind, not decay[:, :, t]: one backward for all steps instead of a full-size gradient
    # buffer per step; reading y_t out at each step keeps no second copy of all the states.
    for decay_t, drive_t, c_t in zip(
        decay.unbind(2), drive.unbind(2), C.float().unbind(2), strict=True
    ):
        h = decay_t * h + drive_t
        outputs.append(torch.bmm(h, c_t.unsqueeze(-1)).squeeze(-1))  # C_t · h_t: [B, Di]
    y = torch.stack(outputs, dim=-1)  # [B, Di, L]
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


def chunked_selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    *,
    chunk: int = SCAN_CHUNK,
) -> Tensor:
    """`selective_scan`'s maths and signature in chunks of `chunk` steps, for GPUs.

    u, delta [B, Di, L]; A [Di, N]; B, C [B, N, L]; D [Di]; z [B, Di, L] -> y [B, Di, L].
    The recurrence runs as `linear_scan`: about chunk + L/chunk sequential steps instead
    of L. Backward saves no state: it recomputes the states from the inputs and runs the
    adjoint recurrence backwards in time the same way, so the saved activations are the
    inputs, O(B·Di·L), against the reference's O(B·Di·N·L); one layer's states exist only
    while that layer's backward runs. Computed in float32, returned in u's dtype.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of steps, got {chunk}")
    dtype = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    # The elementwise parts stay under plain autograd: they save [B, Di, L] tensors only.
    y: Tensor = _ChunkedScan.apply(u, delta, A.float(), B.float(), C.float(), chunk)
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


def linear_scan(delta: Tensor, A: Tensor, w: Tensor, b: Tensor, chunk: int = SCAN_CHUNK) -> Tensor:
    """Every state of h_t = exp(Δ_t A) h_{t-1} + w_t b_t from h_{-1} = 0, in chunks of T steps.

    delta, w [B, Di, L]; A [Di, N]; b [B, N, L] -> h [B, Di, L, N]. Three passes:
    1. every chunk runs its T steps from a zero state, all chunks at once (T - 1 steps);
    2. the state entering each chunk is carried across chunk boundaries (L/T - 1 steps);
    3. each chunk adds its entering state h0 decayed to step t, exp(A S_t) h0 with S_t the
       sum of Δ from the chunk's start to t, for all steps at once.
    exp(A S_t) is the running product of the step decays exp(Δ_j A) <= 1 (Δ >= 0, A < 0)
    over at most T steps: it may underflow to 0, as the true decay does, but never divides
    by a running product, which would overflow on long sequences.
    """
    batch, di, length = w.shape
    n = A.shape[1]
    chunks = -(-length // chunk)
    if chunks * chunk != length:  # Δ = 0 and w = 0 past the end: the state passes unchanged
        delta, w, b = (F.pad(x, (0, chunks * chunk - length)) for x in (delta, w, b))
    dt = delta.reshape(batch, di, chunks, chunk)
    decay = (dt[..., None] * A[:, None, None, :]).exp_()  # [B, Di, chunks, T, N]
    # h starts as the inputs w_t b_t and becomes the states in place: [B, Di, chunks, T, N]
    h = (w[..., None] * b.transpose(1, 2)[:, None]).view(batch, di, chunks, chunk, n)
    # 1. inside every chunk, from a zero state; slices [B, Di, chunks, N]
    for j in range(1, chunk):
        h[:, :, :, j].addcmul_(decay[:, :, :, j], h[:, :, :, j - 1])
    # 2. entering state of chunk c = (decay over chunk c-1) · its entering state + its end
    since_start = decay.cumprod_(3)  # decay from the chunk's start to step t, in place
    entering = torch.zeros_like(h[:, :, :, 0])  # [B, Di, chunks, N]
    for c in range(1, chunks):
        entering[:, :, c] = torch.addcmul(
            h[:, :, c - 1, -1], since_start[:, :, c - 1, -1], entering[:, :, c - 1]
        )
    # 3. each entering state, decayed to every step of its chunk
    h.addcmul_(since_start, entering[:, :, :, None])
    return h.view(batch, di, chunks * chunk, n)[:, :, :length]


class _ChunkedScan(torch.autograd.Function):
    """y_t = C_t · h_t of the recurrence (no D, no gate): the chunked scan's core.

    u, delta [B, Di, L] (delta after bias and softplus); A [Di, N]; B, C [B, N, L].
    Backward, with g_t = dLoss/dh_t: g_t = exp(Δ_{t+1} A) g_{t+1} + C_t dy_t, the same
    recurrence backwards in time; then the chain rule through h_t = a_t h_{t-1} + Δ_t u_t B_t
    with log a_t = Δ_t A, where a_t h_{t-1} = h_t - Δ_t u_t B_t needs no shifted states.
    Both directions run with autocast off: the inputs are float32 and the sums must stay so.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int
    ) -> Tensor:
        ctx.save_for_backward(u, delta, A, B, C)
        ctx.chunk = chunk
        with torch.autocast(u.device.type, enabled=False):
            h = linear_scan(delta, A, delta * u, B, chunk)  # [B, Di, L, N]
            return h.mul_(C.transpose(1, 2)[:, None]).sum(-1)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        with torch.autocast(grad_y.device.type, enabled=False):
            return _ChunkedScan._backward(ctx, grad_y.float())

    @staticmethod
    def _backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        u, delta, A, B, C = ctx.saved_tensors
        b_t = B.transpose(1, 2)[:, None]  # [B, 1, L, N]
        w = delta * u  # [B, Di, L]
        h = linear_scan(delta, A, w, B, ctx.chunk)  # recomputed: [B, Di, L, N]
        grad_C = (grad_y[..., None] * h).sum(1).transpose(1, 2)  # Σ_Di dy_t h_t: [B, N, L]
        carried = h.addcmul_(w[..., None], b_t, value=-1)  # a_t h_{t-1}, in place of h
        del h
        # the adjoint recurrence, run forwards on the time-reversed sequence
        next_delta = F.pad(delta[..., 1:], (0, 1))  # Δ_{t+1}, 0 after the last step
        g = linear_scan(next_delta.flip(-1), A, grad_y.flip(-1), C.flip(-1), ctx.chunk)
        g = g.flip(2)  # [B, Di, L, N]
        grad_B = (g * w[..., None]).sum(1).transpose(1, 2)  # [B, N, L]
        grad_log_decay = carried.mul_(g)  # dLoss/d(Δ_t A), in place of `carried`
        grad_w = g.mul_(b_t).sum(-1)  # [B, Di, L], in place of g
        del g
        # matmuls over B·Di batches of [L, N]: sums over N and L without a [B, Di, L, N] temp
        grad_delta = grad_w * u + (grad_log_decay @ A[:, :, None]).squeeze(-1)
        grad_A = (delta[:, :, None, :] @ grad_log_decay).sum(0).squeeze(1)  # [Di, N]
        return grad_w * delta, grad_delta, grad_A, grad_B, grad_C, None


@functools.cache
def cuda_selective_scan() -> ScanFn | None:
    """mamba-ssm's fused CUDA scan, or None where mamba_ssm is not installed or broken."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # ImportError, or a CUDA extension built for another torch
        return None
    return selective_scan_fn  # type: ignore[no-any-return]


class Mamba(nn.Module):
    """One Mamba mixer: [B, L, D] -> [B, L, D], causal along L.

    in_proj -> (x, z); x -> depthwise causal conv1d -> SiLU -> x_proj -> (dt, B, C);
    dt -> dt_proj -> softplus; selective scan; gate by SiLU(z); out_proj.
    MambaXray-VL uses expand 1, d_state 16, d_conv 4, dt_rank ceil(D/16). `scan_impl` picks
    the selective scan (one of SCAN_IMPLS, see `_scan_fn`).
    """

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 1,
        dt_rank: int | None = None,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        use_cuda_kernels: bool = True,
        scan_impl: str = "auto",
    ) -> None:
        super().__init__()
        if scan_impl not in SCAN_IMPLS:
            raise ValueError(f"scan_impl must be one of {', '.join(SCAN_IMPLS)}, got {scan_impl!r}")
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.dt_range = (dt_min, dt_max, dt_init_floor)
        self.use_cuda_kernels = use_cuda_kernels  # False: "auto" never picks mamba-ssm
        self.scan_impl = scan_impl
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self._add_branch("")
        self.reset_parameters()

    # -- one selective-scan branch: conv1d, x_proj, dt_proj, A_log, D ------------------------
    def _add_branch(self, suffix: str) -> None:
        di, n = self.d_inner, self.d_state
        conv = nn.Conv1d(di, di, self.d_conv, groups=di, padding=self.d_conv - 1, bias=True)
        setattr(self, f"conv1d{suffix}", conv)
        setattr(self, f"x_proj{suffix}", nn.Linear(di, self.dt_rank + 2 * n, bias=False))
        setattr(self, f"dt_proj{suffix}", nn.Linear(self.dt_rank, di, bias=True))
        a_log = nn.Parameter(torch.empty(di, n))
        d = nn.Parameter(torch.empty(di))
        # mamba_ssm's marker: optimizers' parameter grouping should not decay these
        a_log._no_weight_decay = True  # type: ignore[attr-defined]
        d._no_weight_decay = True  # type: ignore[attr-defined]
        setattr(self, f"A{suffix}_log", a_log)
        setattr(self, f"D{suffix}", d)

    def branch_suffixes(self) -> tuple[str, ...]:
        return ("",)

    def _branch(self, suffix: str) -> tuple[nn.Conv1d, nn.Linear, nn.Linear, Tensor, Tensor]:
        return (
            getattr(self, f"conv1d{suffix}"),
            getattr(self, f"x_proj{suffix}"),
            getattr(self, f"dt_proj{suffix}"),
            getattr(self, f"A{suffix}_log"),
            getattr(self, f"D{suffix}"),
        )

    def reset_parameters(self) -> None:
        """mamba_ssm's init: dt_proj so that softplus(bias) is log-uniform in [dt_min,
        dt_max], S4D-real A = -(1..N), D = 1. Linear and conv weights keep PyTorch's init."""
        dt_min, dt_max, floor = self.dt_range
        with torch.no_grad():
            for suffix in self.branch_suffixes():
                _, _, dt_proj, a_log, d = self._branch(suffix)
                std = self.dt_rank**-0.5
                nn.init.uniform_(dt_proj.weight, -std, std)
                dt = torch.exp(
                    torch.rand(self.d_inner, device=dt_proj.bias.device)
                    * (math.log(dt_max) - math.log(dt_min))
                    + math.log(dt_min)
                ).clamp(min=floor)
                dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
                a = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=a_log.device)
                a_log.copy_(torch.log(a).expand(self.d_inner, -1))
                d.fill_(1.0)

    # -- forward --------------------------------------------------------------------------
    def _scan_fn(self, x: Tensor) -> ScanFn:
        """The scan for input x: "reference" and "chunked" as named; "cuda" is mamba-ssm's
        kernel (an error on a GPU without it; the reference on CPU, where it cannot run);
        "auto" is mamba-ssm's kernel on a GPU when it imports (and `use_cuda_kernels`),
        otherwise the chunked scan on a GPU and the reference on CPU."""
        impl = self.scan_impl
        if impl == "reference" or (not x.is_cuda and impl in ("auto", "cuda")):
            return selective_scan
        if impl == "chunked":
            return chunked_selective_scan
        fused = cuda_selective_scan() if self.use_cuda_kernels else None
        if fused is not None:
            return fused
        if impl == "cuda":
            raise RuntimeError(
                "scan 'cuda' needs mamba-ssm's kernels (the `cuda` extra), which do not import "
                "here (or use_cuda_kernels is false); use scan 'auto' or 'chunked'"
            )
        return chunked_selective_scan

    def scan(self, x: Tensor, suffix: str = "", z: Tensor | None = None) -> Tensor:
        """One branch on pre-conv x [B, Di, L] (gated by z [B, Di, L] when given) -> [B, Di, L]."""
        conv, x_proj, dt_proj, a_log, d = self._branch(suffix)
        length = x.shape[-1]
        x = F.silu(conv(x)[..., :length])  # causal: drop the right padding
        dt, b, c = x_proj(x.transpose(1, 2)).split(
            [self.dt_rank, self.d_state, self.d_state], dim=-1
        )  # [B, L, R], [B, L, N], [B, L, N]
        dt = (dt @ dt_proj.weight.t()).transpose(1, 2)  # [B, Di, L]; bias added inside the scan
        scan = self._scan_fn(x)
        return scan(
            x.contiguous(),
            dt.contiguous(),
            -torch.exp(a_log.float()),
            b.transpose(1, 2).contiguous(),
            c.transpose(1, 2).contiguous(),
            d.float(),
            z=None if z is None else z.contiguous(),
            delta_bias=dt_proj.bias.float(),
            delta_softplus=True,
        )

    def forward(self, hidden: Tensor, **_: Any) -> Tensor:
        """hidden [B, L, D] -> [B, L, D]."""
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)  # [B, Di, L] each
        y = self.scan(x, "", z=z)
        return self.out_proj(y.transpose(1, 2))


class Mamba4D(Mamba):
    """The 4-direction mixer: rows and columns, each scanned forward and in reverse, by four
    branches of their own; outputs summed and averaged, then gated and projected once.

    `forward(hidden, column_order=perm)` takes the token permutation [L] that turns the
    row-major sequence into the column-major one (the encoder knows the grid and where its
    CLS token sits). Branch names: "" row forward, "_b" row reverse, "_c" column forward,
    "_c_b" column reverse.
    """

    BRANCHES = ("", "_b", "_c", "_c_b")

    def __init__(self, d_model: int, **kwargs: Any) -> None:
        # The parent builds in/out projections and the first branch; then the other three.
        super().__init__(d_model, **kwargs)
        for suffix in self.BRANCHES[1:]:
            self._add_branch(suffix)
        self.reset_parameters()

    def branch_suffixes(self) -> tuple[str, ...]:
        # Before the extra branches exist (inside Mamba.__init__), only the first is there.
        return tuple(s for s in self.BRANCHES if hasattr(self, f"conv1d{s}"))

    def forward(self, hidden: Tensor, *, column_order: Tensor | None = None, **_: Any) -> Tensor:
        """hidden [B, L, D], column_order [L] (None: rows only, as if one row) -> [B, L, D]."""
        if column_order is None:
            column_order = torch.arange(hidden.shape[1], device=hidden.device)
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)  # [B, Di, L] each
        y = self.scan(x, "") + self.scan(x.flip(-1), "_b").flip(-1)
        xc = x[:, :, column_order]
        yc = self.scan(xc, "_c") + self.scan(xc.flip(-1), "_c_b").flip(-1)
        y = y + yc[:, :, torch.argsort(column_order)]  # back to row order
        y = (y / 4) * F.silu(z.float()).to(y.dtype)
        return self.out_proj(y.transpose(1, 2))

    def load_unidirectional(self, state: dict[str, Tensor]) -> None:
        """Copy a unidirectional `Mamba` state dict into every branch (stage 1 -> stages 2-3)."""
        own = {}
        for name, value in state.items():
            if name.startswith(("in_proj.", "out_proj.")):
                own[name] = value
                continue
            for suffix in self.BRANCHES:
                if name.startswith(("conv1d.", "x_proj.", "dt_proj.")):
                    module, rest = name.split(".", 1)
                    own[f"{module}{suffix}.{rest}"] = value
                elif name in ("A_log", "D"):
                    own[f"A{suffix}_log" if name == "A_log" else f"D{suffix}"] = value
                else:
                    raise KeyError(f"unexpected Mamba parameter {name!r}")
        self.load_state_dict(own, strict=True)
