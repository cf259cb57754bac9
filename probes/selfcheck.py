"""A self-check on the Hessian-vector product: does the operator's ``H v`` equal a derivative of gradients?

Double backward can be wrong where a layer's second derivative is (torch 2.13's ``weight_norm``
parametrization, custom ``autograd.Function``s): the Lanczos values are then exact eigenvalues of the wrong
matrix, reported as converged. Gradients are the most tested derivative in torch, so one product is checked
against a central difference of gradients on a random unit direction ``v``, refined by Richardson:

    D(h) = (∇L(θ + h v) − ∇L(θ − h v)) / 2h,   R = (4 D(h/2) − D(h)) / 3 = H v + O(h⁴),
    h = ε^{1/5} (1 + ‖θ‖)  (ε of the operator's dtype)

``agreement = ‖H v − R‖ / ‖R‖`` is compared with ``tolerance = max(10 e, √ε)``, where
``e = ‖R − D(h/2)‖ / ‖R‖`` estimates the difference's own error from above; when ``e`` is large the
differences cannot judge (``passed=None``). Four gradients and one product.
Only the Hessian has this relation (a GGN or Fisher product is not a derivative of the gradient).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.func import grad

from .operators import CurvatureOperator

__all__ = ["check_product", "INCONCLUSIVE_FD_ERROR"]

#: Above this relative error of the difference itself (piecewise-linear models: ReLU kinks inside the step
#: make gradients jump, ``e`` ≈ 0.1–0.2 on a ReLU MLP) the check gives no verdict (``passed=None``).
INCONCLUSIVE_FD_ERROR = 1e-2


def _gradient_at(op: CurvatureOperator, shift: torch.Tensor) -> torch.Tensor:
    """∇L at θ + shift (flattened, reduced over shards), through the operator's own loss and batches."""
    base = op._primal()
    params = {k: base[k] + d.view_as(base[k]) for k, d in op.space.split(shift).items()}
    g = torch.zeros(op.size, dtype=op.dtype, device=op.device)
    with op.fm.guard():
        for b in op.source:
            g += op.space.flatten(grad(op._batch_loss_fn(b.x, b.y))(params))
    return op.reduce_fn(g) if op.reduce_fn is not None else g


def check_product(op: CurvatureOperator, *, seed: int = 0) -> dict[str, Any]:
    """``{"agreement", "tolerance", "fd_error", "passed", "step"}`` for one product of ``op`` (module
    docstring); ``passed`` is ``None`` for operators other than the Hessian (nothing to compare)."""
    if op.kind != "hessian":
        return {"passed": None, "reason": f"a {op.kind} product is not a derivative of the gradient"}
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(op.size, generator=gen, dtype=torch.float64).to(device=op.device, dtype=op.dtype)
    v = v / v.norm()
    eps = torch.finfo(op.dtype).eps
    theta = float(op.parameters_vector().double().norm())
    h = eps ** (1 / 5) * (1.0 + theta)
    with torch.no_grad():
        diffs = [(_gradient_at(op, s * v) - _gradient_at(op, -s * v)) / (2 * s) for s in (h, h / 2)]
    d_h, d_half = (d.double() for d in diffs)
    r = (4 * d_half - d_h) / 3
    hv = op.matvec(v).double()
    scale = max(float(r.norm()), float(hv.norm()), torch.finfo(torch.float64).tiny)
    agreement = float((hv - r).norm()) / scale
    fd_error = float((r - d_half).norm()) / scale
    tolerance = max(10 * fd_error, math.sqrt(eps))
    out = {
        "agreement": agreement, "tolerance": tolerance, "fd_error": fd_error, "step": h,
        "passed": agreement <= tolerance, "gradients": 4, "products": 1,
    }  # fmt: skip
    if fd_error > INCONCLUSIVE_FD_ERROR:
        out.update(passed=None, reason="the gradient differences disagree with each other (gradients jump "
                   "within the step, e.g. across ReLU kinks): no verdict")  # fmt: skip
    return out
