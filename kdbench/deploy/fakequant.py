"""Fake int8 quantization of a network's Linear and Conv layers, for quantization-aware training
(``deploy=qat``; Jacob et al., "Quantization and training of neural networks for efficient
integer-arithmetic-only inference", CVPR 2018).

Each ``nn.Linear`` / ``nn.Conv1d/2d/3d`` of the network becomes, in place, its fake-quantizing
subclass (its ``__class__`` is swapped: same module object, parameters, state-dict keys, feature
taps and forward hooks), whose forward computes with

- weights rounded to the int8 grid, symmetric, one scale per output channel (or one per tensor):
  ``w_q = clamp(round(w / s), -127, 127) * s`` with ``s = max|w| / 127``;
- its input rounded to the uint8 grid, asymmetric, one scale per tensor, over a range ``[lo,
  hi]`` (widened to hold 0) that is the moving average of the batch minimum and maximum while
  training (``lo <- lo + ema * (min(x) - lo)``; the first batch sets it) and fixed in eval mode:
  ``x_q = (clamp(round(x / s) + z, 0, 255) - z) * s``, ``s = (hi - lo) / 255``,
  ``z = round(-lo / s)``.

Rounding passes gradients straight through inside the grid's range and none outside (torch's
``fake_quantize_*`` ops, the straight-through estimator). These are the grids ONNX Runtime's
static quantization uses (int8 symmetric weights, uint8 activations), so the trained weights
are the ones that quantization keeps. BatchNorm is not folded into the weights during training
(ONNX Runtime folds it before quantizing). The ranges are buffers outside the state dict:
``student.pt`` loads into the plain network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def fake_quant_weight(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """``w`` on the symmetric int8 grid (see the module docstring)."""
    if per_channel:
        scale = (w.detach().abs().flatten(1).amax(1).float() / 127).clamp_min(1e-12)
        zero = torch.zeros(scale.shape, dtype=torch.int32, device=w.device)
        return torch.fake_quantize_per_channel_affine(w.float(), scale, zero, 0, -127, 127).to(
            w.dtype
        )
    scale = (w.detach().abs().max().float() / 127).clamp_min(1e-12)
    zero = torch.zeros((), dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_tensor_affine(w.float(), scale, zero, -127, 127).to(w.dtype)


def activation_qparams(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of the uint8 grid over ``[min(lo, 0), max(hi, 0)]``."""
    lo, hi = lo.float().clamp(max=0), hi.float().clamp(min=0)
    scale = ((hi - lo) / 255).clamp_min(1e-12)
    zero = (-lo / scale).round().clamp(0, 255).to(torch.int32)
    return scale, zero


class FakeQuant:
    """The mixin of the fake-quantizing layers: input range bookkeeping and rounding."""

    def qat_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                lo, hi = x.detach().min().float(), x.detach().max().float()
                ema = self.qat_ema
                seen = self.qat_seen
                self.qat_lo.copy_(torch.where(seen, self.qat_lo + ema * (lo - self.qat_lo), lo))
                self.qat_hi.copy_(torch.where(seen, self.qat_hi + ema * (hi - self.qat_hi), hi))
                self.qat_seen.fill_(True)
            lo, hi = self.qat_lo, self.qat_hi
        elif bool(self.qat_seen):
            lo, hi = self.qat_lo, self.qat_hi
        else:  # evaluated before any training step: the batch's own range
            lo, hi = x.detach().min(), x.detach().max()
        scale, zero = activation_qparams(lo, hi)
        return torch.fake_quantize_per_tensor_affine(x.float(), scale, zero, 0, 255).to(x.dtype)

    def qat_weight(self) -> torch.Tensor:
        return fake_quant_weight(self.weight, self.qat_per_channel)


class QATLinear(FakeQuant, nn.Linear):
    def forward(self, x):
        return F.linear(self.qat_input(x), self.qat_weight(), self.bias)


class QATConv1d(FakeQuant, nn.Conv1d):
    def forward(self, x):
        return self._conv_forward(self.qat_input(x), self.qat_weight(), self.bias)


class QATConv2d(FakeQuant, nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(self.qat_input(x), self.qat_weight(), self.bias)


class QATConv3d(FakeQuant, nn.Conv3d):
    def forward(self, x):
        return self._conv_forward(self.qat_input(x), self.qat_weight(), self.bias)


FLOAT_TO_QAT = {
    nn.Linear: QATLinear,
    nn.Conv1d: QATConv1d,
    nn.Conv2d: QATConv2d,
    nn.Conv3d: QATConv3d,
}
QAT_TO_FLOAT = {v: k for k, v in FLOAT_TO_QAT.items()}
_BUFFERS = ("qat_lo", "qat_hi", "qat_seen")


def add_fake_quant(model: nn.Module, ema: float, per_channel: bool) -> int:
    """Make every plain Linear/Conv layer of ``model`` fake-quantizing; return how many."""
    count = 0
    for m in model.modules():
        cls = FLOAT_TO_QAT.get(type(m))  # exact types: a subclass may have a forward of its own
        if cls is None:
            continue
        m.__class__ = cls
        device = m.weight.device
        m.register_buffer("qat_lo", torch.zeros((), device=device), persistent=False)
        m.register_buffer("qat_hi", torch.zeros((), device=device), persistent=False)
        m.register_buffer("qat_seen", torch.zeros((), dtype=torch.bool, device=device), False)
        m.qat_ema, m.qat_per_channel = float(ema), bool(per_channel)
        count += 1
    return count


def remove_fake_quant(model: nn.Module) -> int:
    """Turn the fake-quantizing layers of ``model`` back into plain ones; return how many."""
    count = 0
    for m in model.modules():
        if isinstance(m, FakeQuant):
            m.__class__ = QAT_TO_FLOAT[type(m)]
            for name in _BUFFERS:
                del m._buffers[name]
            del m.qat_ema, m.qat_per_channel
            count += 1
    return count
