"""dynascope.probes — matrix-free probes of a network's loss landscape and function space.

Public names are loaded lazily from the submodule that defines them (``_EXPORTS``), so
``import dynascope.probes as probes`` is cheap and each probe family lives in its own module.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule of dynascope.probes that defines it
_EXPORTS: dict[str, str] = {
    # curvature engine
    "LinearOperator": "operators",
    "DenseOperator": "operators",
    "CurvatureOperator": "operators",
    "ParamSpace": "operators",
    "make_operator": "operators",
    "parameter_groups": "operators",
    "select_parameters": "operators",
    "eigsh": "lanczos",
    "lanczos_tridiagonal": "lanczos",
    "Loss": "losses",
    "resolve_loss": "losses",
    "Result": "results",
    # empirical NTK and kernel diagnostics
    "empirical_ntk": "ntk",
    "NTKOperator": "ntk",
    "NTKPlan": "ntk",
    "plan_ntk": "ntk",
    "ntk_probe": "ntk_probes",
    "NTKResult": "ntk_probes",
    "ntk_trajectory": "ntk_probes",
    "NTKTrajectory": "ntk_probes",
    "kernel_distance": "kernels",
    "kernel_alignment": "kernels",
    "kernel_velocity": "kernels",
    "relative_param_change": "kernels",
    "center_kernel": "kernels",
    # Hessian spectrum probes
    "hessian_eigenvalues": "hessian",
    "layerwise_hessian": "hessian",
    "HessianEigenResult": "hessian",
    "LayerwiseHessianResult": "hessian",
    "hessian_trace": "trace",
    "TraceResult": "trace",
    "estimate_trace": "trace",
    "hessian_density": "density",
    "DensityResult": "density",
    "smooth_density": "density",
    "spectral_moments": "density",
    "wasserstein1": "density",
    # neural collapse, mode connectivity, permutation alignment
    "neural_collapse": "collapse",
    "nc_trajectory": "collapse",
    "NeuralCollapseResult": "collapse",
    "NeuralCollapseTrajectory": "collapse",
    "lmc_barrier": "connectivity",
    "LMCResult": "connectivity",
    "weight_matching": "alignment",
    "activation_matching": "alignment",
    "apply_permutations": "alignment",
    "permutation_spec": "alignment",
    "UnsupportedArchitectureError": "alignment",
    # sharpness, edge of stability, gradient coherence
    "sharpness": "stability",
    "SharpnessResult": "stability",
    "adaptive_sharpness": "stability",
    "AdaptiveSharpnessResult": "stability",
    "average_sharpness": "stability",
    "AverageSharpnessResult": "stability",
    "preconditioner_from_state": "preconditioning",
    "DiagonalScaledOperator": "preconditioning",
    "track_sharpness": "eos",
    "SharpnessTrack": "eos",
    "gradient_coherence": "coherence",
    "CoherenceResult": "coherence",
    "coherence_stats": "coherence",
    "per_example_gradients": "per_example",
    "GradientMoments": "per_example",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dynascope.probes' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
