"""2-D convolution as one gather + one matrix product, for float64 curvature products on CPU.

PyTorch's CPU convolutions are fast (oneDNN) in float32 but fall back to a per-sample
``slow_conv2d`` loop in float64, which made a float64 Hessian-vector product of a small conv net
~4.6x the float32 one. :func:`conv2d_gemm` computes the same map,

    out[n, o, i, j] = b[o] + Σ_{c, a, e} w[o, c, a, e] · x_pad[n, c, i·s₀ + a·d₀, j·s₁ + e·d₁],

as ``w₂ @ cols`` where ``cols`` ``[C·kh·kw, N·Hₒ·Wₒ]`` gathers the receptive fields of the padded
input (laid out ``[C, N·Hp·Wp]``) with one ``index_select`` (backward: one ``index_add``) and ``w₂``
is the kernel as ``[O, C·kh·kw]``. Every step is an ordinary differentiable op, so first and second
derivatives (double backward, forward mode, ``vmap``) are those of the same function; the result
equals ``F.conv2d`` up to float64 rounding (~1e-16 relative). The output is an ``[N, O, Hₒ, Wₒ]``
view of an ``[O, N, Hₒ, Wₒ]`` tensor.

:class:`Float64GemmConv` is a ``TorchFunctionMode`` that sends ``torch.conv2d`` / ``F.conv2d`` calls
with float64 CPU inputs (4-D, ``groups=1``) to :func:`conv2d_gemm` and leaves every other call alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

Pair = tuple[int, int]
_INDEX_CACHE: dict[tuple, tuple[torch.Tensor, int, int]] = {}


def _pair(v: int | tuple[int, ...] | list[int], name: str) -> Pair:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(a) for a in v)
    if len(t) == 1:
        return (t[0], t[0])
    if len(t) != 2:
        raise ValueError(f"conv2d_gemm: {name} must be an int or a pair; got {v!r}")
    return (t[0], t[1])


def _padding(padding: Any, kernel: Pair, dilation: Pair, stride: Pair) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` zero padding for an int / pair / ``"valid"`` / ``"same"``."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        if stride != (1, 1):
            raise ValueError("conv2d_gemm: padding='same' needs stride 1")
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        return (total[0] // 2, total[0] - total[0] // 2, total[1] // 2, total[1] - total[1] // 2)
    p = _pair(padding, "padding")
    return (p[0], p[0], p[1], p[1])


def _out_size(hp: int, wp: int, kernel: Pair, stride: Pair, dilation: Pair) -> Pair:
    """Output height and width of a convolution over a padded ``hp × wp`` input."""
    return (
        (hp - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1,
        (wp - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1,
    )


def _receptive_index(
    n: int, hp: int, wp: int, kernel: Pair, stride: Pair, dilation: Pair, device: torch.device
) -> tuple[torch.Tensor, int, int]:
    """Flat indices into ``[N·Hp·Wp]`` (padded input of one channel), ordered (a, e, n, i, j) —
    kernel offset, sample, output row, output column — and the output size ``(Hₒ, Wₒ)``."""
    key = (n, hp, wp, kernel, stride, dilation, str(device))
    hit = _INDEX_CACHE.get(key)
    if hit is None:
        ho, wo = _out_size(hp, wp, kernel, stride, dilation)
        if ho < 1 or wo < 1:
            raise ValueError(f"conv2d_gemm: kernel {kernel} does not fit the padded input {hp}x{wp}")
        a = torch.arange(kernel[0]).view(-1, 1, 1, 1, 1) * dilation[0]
        e = torch.arange(kernel[1]).view(1, -1, 1, 1, 1) * dilation[1]
        s = torch.arange(n).view(1, 1, -1, 1, 1) * (hp * wp)
        i = torch.arange(ho).view(1, 1, 1, -1, 1) * stride[0]
        j = torch.arange(wo).view(1, 1, 1, 1, -1) * stride[1]
        hit = ((s + (i + a) * wp + (j + e)).reshape(-1).to(device), ho, wo)
        if len(_INDEX_CACHE) > 64:
            _INDEX_CACHE.clear()
        _INDEX_CACHE[key] = hit
    return hit


def conv2d_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """``F.conv2d`` for 4-D ``x`` ``[N, C, H, W]`` and ``groups=1``, as a gather and one matmul.

    ``cols`` ``[C·kh·kw, N·Hₒ·Wₒ]`` is gathered from the padded input laid out ``[C, N·Hp·Wp]``;
    ``out = w₂ @ cols`` with ``w₂ = weight.reshape(O, C·kh·kw)`` is ``[O, N·Hₒ·Wₒ]``, returned as an
    ``[N, O, Hₒ, Wₒ]`` view (this orientation runs the matmuls and their transposes in the
    faster BLAS layouts for few channels and many positions).
    """
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(
            f"conv2d_gemm expects 4-D input and weight; got {tuple(x.shape)}, {tuple(weight.shape)}"
        )
    if groups != 1:
        raise ValueError(f"conv2d_gemm supports groups=1 only; got {groups}")
    n, c, h, w = x.shape
    o, c_w, kh, kw = weight.shape
    if c_w != c:
        raise ValueError(f"conv2d_gemm: input has {c} channels, weight expects {c_w}")
    st, dl = _pair(stride, "stride"), _pair(dilation, "dilation")
    top, bottom, left, right = _padding(padding, (kh, kw), dl, st)
    hp, wp = h + top + bottom, w + left + right
    idx, ho, wo = _receptive_index(n, hp, wp, (kh, kw), st, dl, x.device)
    xt = x.transpose(0, 1)  # [C, N, H, W]
    if top or bottom or left or right:
        xt = F.pad(xt, (left, right, top, bottom))
    cols = xt.reshape(c, n * hp * wp).index_select(1, idx).reshape(c * kh * kw, n * ho * wo)
    w2 = weight.reshape(o, c * kh * kw)
    out = w2 @ cols if bias is None else torch.addmm(bias[:, None], w2, cols)
    return out.reshape(o, n, ho, wo).transpose(0, 1)


_CONV2D = (torch.conv2d, F.conv2d)
_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def cols_numel(x_shape: torch.Size, w_shape: torch.Size, stride: Any, padding: Any, dilation: Any) -> int:
    """Number of entries of the ``cols`` matrix :func:`conv2d_gemm` would build (``C·kh·kw·N·Hₒ·Wₒ``)."""
    n, c, h, w = x_shape
    kh, kw = w_shape[-2:]
    st, dl = _pair(stride, "stride"), _pair(dilation, "dilation")
    top, bottom, left, right = _padding(padding, (kh, kw), dl, st)
    ho, wo = _out_size(h + top + bottom, w + left + right, (kh, kw), st, dl)
    return c * kh * kw * n * max(ho, 0) * max(wo, 0)


class Float64GemmConv(TorchFunctionMode):
    """Within the block, float64 CPU ``conv2d`` calls (4-D input, ``groups=1``) use :func:`conv2d_gemm`.

    Numerically equivalent to the native float64 kernel (both exact up to float64 rounding); any
    other call (other dtypes, devices, grouped convolutions) goes to PyTorch unchanged, and so does a
    convolution whose ``cols`` matrix would exceed ``max_cols`` entries (default 2²⁴ = 128 MiB of
    float64, times the number of vectors under ``vmap``; autograd keeps it for the backward pass,
    the native kernel keeps only its input).
    ``n_redirected`` counts the convolutions sent to :func:`conv2d_gemm`.
    """

    def __init__(self, max_cols: int = 2**24) -> None:
        super().__init__()
        self.max_cols = int(max_cols)
        self.n_redirected = 0

    def _eligible(self, bound: dict[str, Any]) -> bool:
        x, wt, b = bound.get("input"), bound.get("weight"), bound.get("bias")
        if not (
            isinstance(x, torch.Tensor)
            and isinstance(wt, torch.Tensor)
            and x.dim() == 4
            and wt.dim() == 4
            and x.dtype == wt.dtype == torch.float64
            and x.device.type == wt.device.type == "cpu"
            and (b is None or (isinstance(b, torch.Tensor) and b.dtype == torch.float64))
            and bound.get("groups", 1) == 1
        ):
            return False
        args = (bound.get("stride", 1), bound.get("padding", 0), bound.get("dilation", 1))
        try:
            return cols_numel(x.shape, wt.shape, *args) <= self.max_cols
        except (ValueError, TypeError):  # unusual arguments: let PyTorch handle (and report) them
            return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONV2D:
            bound = dict(zip(_NAMES, args)) | kwargs
            if self._eligible(bound):
                self.n_redirected += 1
                return conv2d_gemm(
                    bound["input"],
                    bound["weight"],
                    bound.get("bias"),
                    bound.get("stride", 1),
                    bound.get("padding", 0),
                    bound.get("dilation", 1),
                )
        return func(*args, **kwargs)


__all__ = ["Float64GemmConv", "conv2d_gemm", "cols_numel"]
