"""The Mamba mixer (selective state-space layer) for Vision Mamba, with no compiled dependency.

Parameter names follow `mamba_ssm.modules.mamba_simple.Mamba` (in_proj, conv1d, x_proj,
dt_proj, A_log, D, out_proj), so a checkpoint moves between this pure-PyTorch path and the
`mamba-ssm` CUDA kernels, which are used when the input is on a GPU and `mamba_ssm` imports
(the `cuda` extra). The import is lazy: nothing here needs mamba-ssm to build or train on CPU.

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
    MambaXray-VL uses expand 1, d_state 16, d_conv 4, dt_rank ceil(D/16).
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
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.dt_range = (dt_min, dt_max, dt_init_floor)
        self.use_cuda_kernels = use_cuda_kernels
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
        if self.use_cuda_kernels and x.is_cuda:
            fused = cuda_selective_scan()
            if fused is not None:
                return fused
        return selective_scan

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
