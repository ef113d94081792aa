"""AdaRound: learned weight rounding by output reconstruction (Nagel et al., ICML 2020,
"Up or Down? Adaptive Rounding for Post-Training Quantization"), as BRECQ's reference code
(github.com/yhhhli/BRECQ, ``quant/adaptive_rounding.py``, ``quant/block_recon.py``) runs it.

A weight ``W`` with step ``s`` (per output channel or per tensor) and integer range
``[qmin, qmax]`` is quantized as

    W_q = s * (clip(floor(W / s) + h(V) + zp, qmin, qmax) - zp)
    h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1),   zeta = 1.1, gamma = -0.1

with one continuous variable ``V`` per weight, initialised so that ``h(V)`` equals the
fractional part of ``W / s`` (the soft-quantized weight starts at ``W``). ``V`` is
learned with Adam (learning rate 1e-3, the reference code's default) on

    loss = rec(block_q(x_q), block_fp(x_fp)) + lam * sum(1 - |2 h(V) - 1| ** beta)

* ``rec`` is the reference code's ``lp_loss``: ``|pred - tgt| ** p`` summed over the
  channel axis (axis 1) and averaged over the rest (p = 2: the squared error), or, with
  Fisher weighting, ``((pred - tgt) ** 2 * g ** 2).sum(1).mean()`` where ``g`` is the
  (damped) gradient of the task loss with respect to the block output;
* ``beta`` is 20 during the first ``warmup`` fraction (0.2) of the iterations, when the
  regulariser is off, then decays linearly to 2 (``LinearTempDecay`` of the reference
  code); ``lam`` = 0.01 (the paper's and the code's default);
* at the end the rounding is hard: ``h(V) >= 0.5`` (equivalently ``V >= 0``) rounds up.

The weight step is initialised as BRECQ does (``scale_method='mse'``): for each channel,
the clipping ratio ``r`` in 1.00, 0.99, ..., 0.21 (80 candidates) whose quantization
minimises ``sum |W - Q(W)| ** p``, p = 2.4 (the reference code's norm; ``p=2`` gives the
MSE-optimal clipping). hago's weights are signed and by default symmetric
(``qmin = -2**(b-1)``, ``qmax = 2**(b-1) - 1``, zero point 0, ``s = r * max|W| / qmax``);
``symmetric=False`` gives the reference code's asymmetric grid (range ``[r*min, r*max]``,
zero point shifted into the signed range).

Activation steps (when activations are quantized) are learned afterwards with LSQ-style
gradient descent on the step (the reference code: straight-through rounding, Adam, lr
4e-4, cosine decay, ``lp_loss`` with p = 2.4), see :class:`ActQuantizer`; deviation: a
step's rate is capped at 1 % of its initial value per iteration (Adam's update does not
scale with the parameter, and a small step, e.g. 0.003 for attention probabilities, would
be driven through 0 in a few iterations).

torch is imported only inside the functions that need it (``pip install hago[train]``).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Sequence

import numpy as np

from ..errors import HagoError
from .torch_bridge import require_torch

__all__ = [
    "ZETA", "GAMMA", "weight_qrange", "channel_axis", "init_weight_scale", "quantize_nearest",
    "LinearTempDecay", "adaround_quantizer", "act_quantizer", "fixed_quantizer", "reconstruct",
    "init_act_range",
]

ZETA, GAMMA = 1.1, -0.1
CLIP_GRID = tuple(1.0 - 0.01 * i for i in range(80))  # the reference code's 80 shrink ratios


# ---------------------------------------------------------------------------------------------
# Weight grid (numpy)
# ---------------------------------------------------------------------------------------------

def weight_qrange(bits: int) -> tuple[int, int]:
    """Signed integer range of a ``bits``-bit weight (hago's weight containers are signed)."""
    if not 2 <= int(bits) <= 16:
        raise HagoError(f"weight bits must be in [2, 16], got {bits}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def channel_axis(op_type: str, ndim: int, trans_b: int = 0) -> int:
    """Output-channel axis of a weight: 0 for Conv and Gemm(transB=1), 1 for Gemm(transB=0), last for MatMul."""
    if op_type == "Gemm":
        return 0 if trans_b else 1
    if op_type == "MatMul":
        return ndim - 1
    return 0


def _to_rows(w: np.ndarray, axis: int | None) -> np.ndarray:
    if axis is None:
        return w.reshape(1, -1)
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)


def _bshape(w: np.ndarray, axis: int | None) -> tuple:
    if axis is None:
        return ()
    shape = [1] * w.ndim
    shape[axis] = -1
    return tuple(shape)


def init_weight_scale(w: np.ndarray, bits: int, axis: int | None, *, symmetric: bool = True,
                      p: float = 2.4, grid: Sequence[float] = CLIP_GRID) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (``axis``) or per-tensor (``axis=None``) step and zero point minimising ``sum|W - Q(W)|^p``.

    Returns ``(scale float32, zero_point int64)``, 1-D of length ``w.shape[axis]`` or 0-d.
    Channels that are all zero get scale 1.
    """
    w = np.asarray(w, dtype=np.float32)
    rows = _to_rows(w, axis).astype(np.float64)
    qmin, qmax = weight_qrange(bits)
    best_err = np.full(rows.shape[0], np.inf)
    best_s = np.ones(rows.shape[0])
    best_z = np.zeros(rows.shape[0])
    if symmetric:
        amax = np.abs(rows).max(axis=1)
    else:
        rmin, rmax = rows.min(axis=1), rows.max(axis=1)
    for r in grid:
        if symmetric:
            s = np.maximum(amax * r / qmax, 1e-12)
            z = np.zeros_like(s)
        else:
            lo, hi = np.minimum(rmin * r, 0.0), np.maximum(rmax * r, 0.0)
            s = np.maximum((hi - lo) / (qmax - qmin), 1e-12)
            z = np.round(-lo / s) + qmin
        q = np.clip(np.round(rows / s[:, None]) + z[:, None], qmin, qmax)
        err = (np.abs(rows - (q - z[:, None]) * s[:, None]) ** p).sum(axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s, best_s)
        best_z = np.where(better, z, best_z)
    zero = np.abs(rows).max(axis=1) < 1e-30
    best_s = np.where(zero, 1.0, best_s).astype(np.float32)
    best_z = np.where(zero, 0, best_z).astype(np.int64)
    if axis is None:
        return np.float32(best_s[0]).reshape(()), np.int64(best_z[0]).reshape(())
    return best_s, best_z


def quantize_nearest(w: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, bits: int,
                     axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest (half to even, as QuantizeLinear): ``(codes int64, W_q float32 = s * (q - zp))``."""
    w = np.asarray(w, dtype=np.float32)
    qmin, qmax = weight_qrange(bits)
    s = np.asarray(scale, np.float32).reshape(_bshape(w, axis))
    z = np.asarray(zero_point, np.int64).reshape(_bshape(w, axis))
    q = np.clip(np.rint(w / s) + z, qmin, qmax).astype(np.int64)
    return q, dequantize(q, scale, zero_point, axis)


def dequantize(q: np.ndarray, scale, zero_point, axis: int | None) -> np.ndarray:
    """``s * (q - zp)`` in float32 (the value DequantizeLinear computes)."""
    s = np.asarray(scale, np.float32).reshape(_bshape(q, axis))
    z = np.asarray(zero_point, np.int64).reshape(_bshape(q, axis))
    return ((q - z).astype(np.float32) * s).astype(np.float32)


def check_on_grid(name: str, w_q: np.ndarray, q: np.ndarray, scale, zero_point, axis: int | None) -> None:
    """Raise unless ``rint(W_q / s) + zp`` reproduces the integer codes exactly (float32 arithmetic)."""
    s = np.asarray(scale, np.float32).reshape(_bshape(q, axis))
    z = np.asarray(zero_point, np.int64).reshape(_bshape(q, axis))
    back = np.rint(np.asarray(w_q, np.float32) / s).astype(np.int64) + z
    if not np.array_equal(back, q):
        bad = int((back != q).sum())
        raise HagoError(f"weight {name!r}: {bad} quantized values do not map back to their integer codes")


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------

class LinearTempDecay:
    """beta(t): ``start_b`` until ``rel_start * t_max``, then linear down to ``end_b`` at ``t_max``."""

    def __init__(self, t_max: int, rel_start: float = 0.2, start_b: float = 20.0, end_b: float = 2.0):
        self.t_max = t_max
        self.start = rel_start * t_max
        self.start_b, self.end_b = start_b, end_b

    def __call__(self, t: int) -> float:
        if t < self.start:
            return self.start_b
        rel = (t - self.start) / max(self.t_max - self.start, 1e-12)
        return self.end_b + (self.start_b - self.end_b) * max(0.0, 1.0 - rel)


# ---------------------------------------------------------------------------------------------
# Quantizer modules (torch, built lazily)
# ---------------------------------------------------------------------------------------------

_CLASSES: dict = {}


def _classes() -> dict:
    if _CLASSES:
        return _CLASSES
    torch = require_torch()
    from torch import nn

    def round_ste(x):
        return (x.round() - x).detach() + x

    class AdaRoundQuantizer(nn.Module):
        """Fake-quantizer of one weight tensor with learned rounding (``alpha`` = V)."""

        def __init__(self, weight, scale, zero_point, bits: int, axis: int | None):
            super().__init__()
            w = torch.as_tensor(np.asarray(weight, np.float32))
            shape = _bshape(np.empty(w.shape), axis)
            self.bits, self.axis = int(bits), axis
            self.qmin, self.qmax = weight_qrange(bits)
            self.register_buffer("delta", torch.as_tensor(np.asarray(scale, np.float32)).reshape(shape))
            self.register_buffer("zero_point", torch.as_tensor(np.asarray(zero_point, np.float32)).reshape(shape))
            self.soft_targets = True
            x = w / self.delta
            rest = x - torch.floor(x)
            # sigmoid(alpha) * (zeta - gamma) + gamma = rest
            alpha = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)
            self.alpha = nn.Parameter(alpha)

        def h(self):
            return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

        def codes(self, w):
            """Integer codes of the hard-rounded weight (float tensor)."""
            x = torch.floor(w / self.delta) + (self.alpha >= 0).to(w.dtype)
            return torch.clamp(x + self.zero_point, self.qmin, self.qmax)

        def forward(self, w):
            x = torch.floor(w / self.delta)
            x = x + (self.h() if self.soft_targets else (self.alpha >= 0).to(w.dtype))
            xq = torch.clamp(x + self.zero_point, self.qmin, self.qmax)
            return (xq - self.zero_point) * self.delta

        def round_loss(self, beta: float):
            return (1 - (2 * (self.h() - 0.5).abs()).pow(beta)).sum()

    class ActQuantizer(nn.Module):
        """Per-tensor asymmetric activation fake-quantizer with a learnable step (LSQ, as the reference code).

        Unsigned ``bits``-bit codes ``[0, 2**bits - 1]``; zero point fixed at initialisation.
        """

        def __init__(self, bits: int, scale=None, zero_point=None, p: float = 2.4):
            super().__init__()
            self.bits = int(bits)
            self.qmin, self.qmax = 0, 2 ** self.bits - 1
            self.p = p
            self.delta = nn.Parameter(torch.tensor(1.0 if scale is None else float(scale)))
            self.register_buffer("zero_point", torch.tensor(0.0 if zero_point is None else float(zero_point)))
            self.inited = scale is not None
            self.enabled = True

        def init_from(self, x) -> None:
            s, z = init_act_range(x.detach().cpu().numpy(), self.bits, p=self.p)
            with torch.no_grad():
                self.delta.copy_(torch.tensor(float(s)))
                self.zero_point.copy_(torch.tensor(float(z)))
            self.inited = True

        def forward(self, x):
            if not self.enabled:
                return x
            if not self.inited:
                self.init_from(x)
            d = self.delta.clamp(min=1e-8)
            xi = round_ste(x / d) + self.zero_point
            xq = torch.clamp(xi, self.qmin, self.qmax)
            return (xq - self.zero_point) * d

        def qparams(self) -> tuple[np.float32, np.int64]:
            return np.float32(self.delta.detach().item()), np.int64(round(self.zero_point.item()))

    class FixedQuantizer(nn.Module):
        """Replaces a weight by a fixed (already quantized) tensor."""

        def __init__(self, value):
            super().__init__()
            self.register_buffer("value", torch.as_tensor(np.asarray(value, np.float32)))

        def forward(self, w):
            return self.value

    _CLASSES.update(AdaRoundQuantizer=AdaRoundQuantizer, ActQuantizer=ActQuantizer,
                    FixedQuantizer=FixedQuantizer, round_ste=round_ste)
    return _CLASSES


def adaround_quantizer(weight, scale, zero_point, bits: int, axis: int | None):
    """An ``AdaRoundQuantizer`` module (torch) for one weight tensor."""
    return _classes()["AdaRoundQuantizer"](weight, scale, zero_point, bits, axis)


def act_quantizer(bits: int, scale=None, zero_point=None, p: float = 2.4):
    """An ``ActQuantizer`` module: initialises its range on the first tensor it sees unless given."""
    return _classes()["ActQuantizer"](bits, scale, zero_point, p)


def fixed_quantizer(value):
    return _classes()["FixedQuantizer"](value)


def init_act_range(x: np.ndarray, bits: int, *, p: float = 2.4,
                   grid: Sequence[float] = CLIP_GRID, max_samples: int = 200_000) -> tuple[np.float32, np.int64]:
    """Asymmetric unsigned step and zero point of an activation minimising ``mean|x - Q(x)|^p``.

    As the reference code's ``scale_method='mse'``: the range ``[r*min, r*max]`` for the 80
    ratios r; hago additionally widens the range to contain 0 so that 0 is exact.
    """
    x = np.asarray(x, np.float32).reshape(-1)
    lo0, hi0 = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    if x.size > max_samples:  # the error is measured on a deterministic subsample (the range on all values)
        x = x[np.random.RandomState(0).randint(0, x.size, max_samples)]
    qmax = 2 ** int(bits) - 1
    if hi0 - lo0 < 1e-12:
        return np.float32(1.0), np.int64(0)
    best = (np.inf, None, None)
    for r in grid:
        lo, hi = lo0 * r, hi0 * r
        s = (hi - lo) / qmax
        z = float(np.round(-lo / s))
        q = np.clip(np.round(x / s) + z, 0, qmax)
        err = float(np.mean(np.abs(x - (q - z) * s) ** p))
        if err < best[0]:
            best = (err, s, z)
    return np.float32(best[1]), np.int64(best[2])


# ---------------------------------------------------------------------------------------------
# The reconstruction loop
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ReconLog:
    iters: int
    seconds: float
    first_rec: float
    last_rec: float
    last_round: float
    history: list  # (iteration, rec loss, round loss, beta)


def lp_loss(pred, tgt, p: float = 2.0):
    """The reference code's ``lp_loss``: ``|pred - tgt|^p`` summed over axis 1 (channels), mean over the rest."""
    d = (pred - tgt).abs().pow(p)
    return d.sum(1).mean() if d.dim() > 1 else d.mean()


def reconstruct(forward: Callable[[dict], dict], inputs: dict, targets: dict, *,
                weight_quantizers: Sequence = (), act_params: Sequence = (), grads: dict | None = None,
                iters: int = 2000, batch_size: int = 32, lam: float = 0.01,
                b_range: tuple[float, float] = (20.0, 2.0), warmup: float = 0.2, p: float = 2.0,
                lr: float | None = None, seed: int = 0, log_every: int = 0) -> ReconLog:
    """Optimise the rounding variables (``weight_quantizers``) or activation steps (``act_params``).

    ``forward(batch)`` maps a dict of block-input tensors to a dict of block outputs (with the
    quantizers applied). ``inputs`` / ``targets`` / ``grads`` hold the cached calibration
    tensors (first axis = sample): quantized-model block inputs, fp32 block outputs and, for
    Fisher weighting, the gradients of the task loss w.r.t. the block outputs.

    Weight mode (``weight_quantizers`` given): Adam (lr 1e-3) on every quantizer's ``alpha``, loss =
    rec + lam * rounding regulariser (off during warm-up, beta annealed over ``b_range``); at the end the
    quantizers switch to hard rounding. Activation mode (``act_params``): Adam (lr 4e-4) with cosine
    decay on the steps, loss = rec only.
    """
    torch = require_torch()
    if weight_quantizers and act_params:
        raise HagoError("reconstruct optimises either weight rounding or activation steps, not both at once")
    n = next(iter(inputs.values())).shape[0]
    gen = torch.Generator().manual_seed(int(seed))
    weight_mode = bool(weight_quantizers)
    if weight_mode:
        for q in weight_quantizers:
            q.soft_targets = True
        params = [q.alpha for q in weight_quantizers]
        opt = torch.optim.Adam(params, lr=1e-3 if lr is None else lr)
        sched = None
    else:
        params = list(act_params)
        base = 4e-4 if lr is None else lr
        # Adam moves every parameter by about ``lr`` per iteration whatever its size: a step of 0.003
        # (the softmax probabilities of an attention, 8 bits) reaches 0 in a few iterations and the
        # quantizer then zeroes the tensor. Each step's rate is capped at 1 % of its initial value.
        groups = [{"params": [q], "lr": min(base, 0.01 * float(q.detach().abs().max()))} for q in params]
        opt = torch.optim.Adam(groups, lr=base)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(iters, 1), eta_min=0.0)
    decay = LinearTempDecay(iters, rel_start=warmup, start_b=b_range[0], end_b=b_range[1])
    loss_start = iters * warmup
    t0 = time.perf_counter()
    history = []
    first = last = last_round = float("nan")
    bs = min(int(batch_size), n)
    for it in range(1, iters + 1):
        idx = torch.randperm(n, generator=gen)[:bs]
        batch = {k: v[idx] for k, v in inputs.items()}
        opt.zero_grad(set_to_none=True)
        out = forward(batch)
        rec = 0.0
        for name, tgt in targets.items():
            pred, t = out[name], tgt[idx]
            if grads is not None:
                g = grads[name][idx]
                d = (pred - t).pow(2) * g.pow(2)
                rec = rec + (d.sum(1).mean() if d.dim() > 1 else d.mean())
            else:
                rec = rec + lp_loss(pred, t, p)
        beta = decay(it)
        if weight_mode and it >= loss_start:
            rnd = lam * sum(q.round_loss(beta) for q in weight_quantizers)
        else:
            rnd = torch.zeros(())
        loss = rec + rnd
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if it == 1:
            first = float(rec.detach())
        if log_every and (it % log_every == 0 or it == iters):
            history.append((it, float(rec.detach()), float(rnd.detach()), float(beta)))
        last, last_round = float(rec.detach()), float(rnd.detach())
    if weight_mode:
        for q in weight_quantizers:
            q.soft_targets = False
    return ReconLog(iters=iters, seconds=time.perf_counter() - t0, first_rec=first, last_rec=last,
                    last_round=last_round, history=history)
