"""int8 on the CPU: the block projections as int8 matrix products, one activation scale per token.

:func:`quantize_int8` turns a float32 CPU model's four projections per block (q;k;v, out,
SwiGLU in, SwiGLU out) into :class:`Int8Linear`: weights int8 with one scale per output
channel (symmetric), activations quantised on the fly with one scale per row (token), the
products accumulated exactly in int32 by oneDNN (``torch.ops.onednn.qlinear_pointwise``, the
x86 int8 linear that PyTorch's own quantisation flows lower to), then rescaled to float32.
Attention, norms, rotary, the embedding and the sequence head stay float32.

Batch invariance: a row's scale depends on that row alone and integer accumulation is exact,
so a protein's outputs do not depend on its batch-mates (as in float32).

Activation precision depends on the CPU. With AVX-512 VNNI, AVX-VNNI or AMX (one instruction
multiplies and accumulates u8 x s8 into int32) activations use 8 bits (-127..127). Without
them (AVX2 or AVX-512 alone) the u8 x s8 pairs are summed in saturating int16 first, and
full-range activations overflow (measured: 10% error on random data); there they use 7 bits
(-63..63), exact but coarser, and the int8 products are slower: :func:`quantize_int8` logs a
warning. int8 changes the numbers, so it is chosen explicitly only (``dtype=torch.int8`` when
loading, ``esmc serve --dtype int8``), never by ``auto``. A quantised model is for inference
on the CPU; its state dict lacks the quantised weights (quantise after loading instead).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

INT8_CPU_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8")
"""CPU features (torch's names, also ``/proc/cpuinfo``'s) that multiply int8 natively."""


def cpu_has_fast_int8(capabilities: dict[str, bool] | None = None) -> bool:
    """Whether this CPU (or the given ``capabilities``) has VNNI or AMX int8 products."""
    if capabilities is None:
        from esmc.runtime import cpu_capabilities

        capabilities = cpu_capabilities()
    return any(capabilities.get(name, False) for name in INT8_CPU_FEATURES)


def activation_bits_for(capabilities: dict[str, bool] | None = None) -> int:
    """8 where the CPU accumulates u8 x s8 without int16 saturation (VNNI, AMX), else 7."""
    return 8 if cpu_has_fast_int8(capabilities) else 7


class Int8Linear(nn.Module):
    """``y = x W^T (+ b)`` with int8 per-channel weights and per-row int8 activations.

    ``x``: (..., in) float32, any strides; ``y``: (..., out) float32. Row ``i`` is quantised
    as ``round(x_i / s_i)`` with ``s_i = max|x_i| / levels`` (``levels`` 127 or 63), stored as
    uint8 around a zero point of ``levels + 1``; the int32 products are scaled by
    ``s_i * w_scale_j``.
    """

    def __init__(self, linear: nn.Linear, activation_bits: int = 8):
        super().__init__()
        if activation_bits not in (7, 8):
            raise ValueError(f"activation_bits must be 7 or 8, not {activation_bits}")
        weight = linear.weight.detach().to(torch.float32)  # (out, in)
        if weight.device.type != "cpu":
            raise ValueError("int8 linears run on the CPU only")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.levels = 2 ** (activation_bits - 1) - 1
        scale = weight.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
        self.register_buffer("weight_scale", scale, persistent=False)  # (out,)
        quantized = torch.round(weight / scale[:, None]).to(torch.int8)  # (out, in)
        self._packed = torch.ops.onednn.qlinear_prepack(quantized, None)
        self._weight_zero = torch.zeros(self.out_features, dtype=torch.int32)
        self._x_scale = torch.tensor(1.0)
        self._x_zero = torch.tensor(self.levels + 1, dtype=torch.int32)
        bias = None if linear.bias is None else linear.bias.detach().to(torch.float32)
        self.register_buffer("bias", bias, persistent=False)

    def extra_repr(self) -> str:
        bits = 8 if self.levels == 127 else 7
        return f"in={self.in_features}, out={self.out_features}, activations {bits}-bit per row"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (N, in); a copy only if x's strides need one
        lo, hi = torch.aminmax(rows, dim=1)
        scale = torch.maximum(-lo, hi).clamp_min_(1e-30).div_(self.levels)  # (N,)
        codes = torch.div(rows, scale[:, None]).round_().add_(self.levels + 1).to(torch.uint8)
        out = torch.ops.onednn.qlinear_pointwise.tensor(
            codes, self._x_scale, self._x_zero, self._packed, self.weight_scale,
            self._weight_zero, None, 1.0, 0, torch.float32, "none", [], "",
        )  # (N, out): int32 products * w_scale
        out.mul_(scale[:, None])
        if self.bias is not None:
            out.add_(self.bias)
        return out.view(*x.shape[:-1], self.out_features)


def quantize_int8(model: nn.Module, activation_bits: int | None = None) -> nn.Module:
    """Replace ``model``'s block projections by :class:`Int8Linear`, in place; returns it.

    ``model``: an :class:`esmc.model.ESMCNetwork` (or :class:`esmc.ESMC`) in float32 on the
    CPU; its ``quantization`` names what was done. ``activation_bits``: 8 or 7; ``None`` picks
    by the CPU (:func:`activation_bits_for`) and logs a warning where the CPU
    has neither VNNI nor AMX.
    """
    if model.device.type != "cpu" or model.dtype != torch.float32:
        raise ValueError(
            f"int8 quantises a float32 model on the CPU, not {model.dtype} on {model.device}"
        )
    if activation_bits is None:
        activation_bits = activation_bits_for()
        if activation_bits < 8:
            log.warning(
                "int8 on a CPU without AVX-512 VNNI, AVX-VNNI or AMX: int8 products are slow "
                "here and activations use 7 bits; float32 is likely as fast and more accurate"
            )
    for block in model.transformer.blocks:
        attn, ffn = block.attn, block.ffn
        attn.layernorm_qkv[1] = Int8Linear(attn.layernorm_qkv[1], activation_bits)
        attn.out_proj = Int8Linear(attn.out_proj, activation_bits)
        ffn[1] = Int8Linear(ffn[1], activation_bits)
        ffn[3] = Int8Linear(ffn[3], activation_bits)
    model.quantization = f"int8 (activations {activation_bits}-bit per token)"
    return model


def is_int8(model: nn.Module) -> bool:
    """Whether :func:`quantize_int8` has run on ``model``."""
    return getattr(model, "quantization", None) is not None
