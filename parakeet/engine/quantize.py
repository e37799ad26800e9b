"""
Eight-bit encoder weights for CPU serving (``--precision int8``).

At the batch sizes of a CPU server a step is bound by reading the encoder's
linear weights from memory; eight-bit weights read four times less and run
on integer kernels (fbgemm, AVX2 and up).  torch's dynamic quantization
would make a stream's result depend on the streams it is batched with,
because it quantizes activations with one scale for the whole batch.
:class:`Int8Linear` maps every row onto [-1, 1] (an affine map, undone
after the product) and quantizes it on one fixed grid, so integer products
are exact and a stream's output is bitwise the same whatever else is in the
batch.
"""

import warnings

import torch
from torch import nn


#: Inputs mapped onto [-1, 1] are quantized on this fixed grid: fbgemm's
#: integer kernels take 7-bit unsigned inputs, 0..127 with zero at 64.
_INPUT_SCALE = 1.0 / 63
_INPUT_ZERO = 64


class Int8Linear(nn.Module):
    """A linear layer with per-channel int8 weights and per-row int8 inputs."""

    def __init__(self, linear):
        """linear: an nn.Linear, or a width-one nn.Conv1d (the same map)."""
        super().__init__()
        weight = linear.weight.detach().float()
        weight = weight.reshape(weight.size(0), -1)
        self.out_features, self.in_features = weight.shape
        scales = (weight.abs().amax(dim=1) / 127).clamp_min(1e-12).double()
        with warnings.catch_warnings():
            # Quantized tensors are deprecated in torch, not yet removed.
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.quantize_per_channel(
                weight, scales, torch.zeros(len(scales), dtype=torch.long), 0, torch.qint8)
        self._packed = torch.ops.quantized.linear_prepack(qweight, None)
        # W x = half * (W u) + centre * (W 1), for x = centre + half * u.
        self.register_buffer("row_sums", qweight.dequantize().sum(dim=1))
        bias = torch.zeros(self.out_features) if linear.bias is None else linear.bias
        self.register_buffer("bias", bias.detach().float().clone())

    def forward(self, x):
        rows = x.reshape(-1, self.in_features).float()
        lo, hi = torch.aminmax(rows, dim=1, keepdim=True)
        centre = (hi + lo) * 0.5
        half = ((hi - lo) * 0.5).clamp_min(1e-30)
        unit = (rows - centre) / half
        out = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            unit, _INPUT_SCALE, _INPUT_ZERO, self._packed)
        out = torch.addcmul(torch.addcmul(self.bias, centre, self.row_sums), out, half)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self):
        return "in_features=%d, out_features=%d" % (self.in_features, self.out_features)


class Int8Pointwise(Int8Linear):
    """A width-one convolution (the conformer convolution module's pointwise
    ones) with :class:`Int8Linear`'s arithmetic."""

    def forward(self, x):
        """x: [B, D, T], as nn.Conv1d takes it."""
        return self.channels_last(x.transpose(1, 2)).transpose(1, 2)

    def channels_last(self, x):
        """x: [B, T, D], as the accelerated streaming step holds it."""
        return Int8Linear.forward(self, x)


def quantize_encoder(encoder):
    """Replace the encoder's linear layers, and the pointwise convolutions of
    its convolution modules, by eight-bit ones, in place.

    Attention position projections stay in float: the accelerated streaming
    step computes them once per geometry.  Returns how many were replaced."""
    from .nemo.fastencoder import is_pointwise

    targets = []
    for name, module in encoder.named_modules():
        for child_name, child in module.named_children():
            if type(child) is nn.Linear and child_name != "linear_pos":
                targets.append((module, child_name, Int8Linear(child)))
            elif child_name.startswith("pointwise_conv") and is_pointwise(child):
                targets.append((module, child_name, Int8Pointwise(child)))
    for parent, child_name, quantized in targets:
        setattr(parent, child_name, quantized)
    return len(targets)
