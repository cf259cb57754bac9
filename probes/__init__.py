"""dynascope.probes — matrix-free probes of a network's loss landscape and function space.

Public names are loaded lazily from the submodule that defines them (``_EXPORTS``), so
``import dynascope.probes as probes`` is cheap and each probe family lives in its own module.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule of dynascope.probes that defines it. No submodule may carry a public name:
# importing it would set the package attribute of that name to the module (tests/test_probes_api.py).
_EXPORTS: dict[str, str] = {
    # curvature engine
    "LinearOperator": "operators",
    "DenseOperator": "operators",
    "CurvatureOperator": "operators",
    "ParamSpace": "functional",
    "make_operator": "operators",
    "OperatorSpec": "operators",
    "parameter_groups": "functional",
    "select_parameters": "functional",
    "eigsh": "lanczos",
    "sharded_operator": "sharded",
    "MemoryBudgetError": "budget",
    "FiniteDifferenceHessian": "sharded",
    "SplitVectorsOperator": "sharded",
    "lanczos_tridiagonal": "lanczos",
    "Loss": "losses",
    "resolve_loss": "losses",
    "Result": "results",
    # empirical NTK and kernel diagnostics
    "empirical_ntk": "ntk.empirical",
    "NTKOperator": "ntk.empirical",
    "NTKPlan": "ntk.empirical",
    "plan_ntk": "ntk.empirical",
    "ntk_probe": "ntk.diagnostics",
    "NTKResult": "ntk.diagnostics",
    "ntk_trajectory": "ntk.diagnostics",
    "NTKTrajectoryResult": "ntk.diagnostics",
    "kernel_distance": "ntk.kernels",
    "kernel_alignment": "ntk.kernels",
    "kernel_velocity": "ntk.kernels",
    "relative_param_change": "ntk.kernels",
    "center_kernel": "ntk.kernels",
    # Hessian spectrum probes
    "hessian_eigenvalues": "hessian",
    "layerwise_hessian": "hessian",
    "blockwise_spectra": "blockwise",
    "MFACInverse": "mfac",
    "KFACOperator": "kronecker",
    "kfac": "kronecker",
    "ekfac": "kronecker",
    "mfac_inverse": "mfac",
    "gradient_window": "mfac",
    "BlockwiseSpectraResult": "blockwise",
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
    "hessian_diagonal": "diagonal",
    "HessianDiagonalResult": "diagonal",
    # loss-landscape slices and trajectories
    "loss_landscape": "landscape",
    "landscape_trajectory": "landscape",
    "landscape_between": "landscape",
    "LandscapeResult": "landscape",
    "filter_normalized_direction": "landscape",
    "opposing_signals": "opposing",
    "OpposingSignalsResult": "opposing",
    # neural collapse, mode connectivity, permutation alignment
    "neural_collapse": "collapse",
    "nc_trajectory": "collapse",
    "NeuralCollapseResult": "collapse",
    "NeuralCollapseTrajectoryResult": "collapse",
    "lmc_barrier": "connectivity",
    "LMCResult": "connectivity",
    "weight_matching": "alignment",
    "activation_matching": "alignment",
    "apply_permutations": "alignment",
    "permutation_spec": "alignment",
    "UnsupportedArchitectureError": "alignment",
    # sharpness, edge of stability, gradient coherence
    "sharpness": "curvature_sharpness",
    "SharpnessResult": "curvature_sharpness",
    "track_sharpness": "curvature_sharpness",
    "SharpnessTrackResult": "curvature_sharpness",
    "adaptive_sharpness": "perturbation",
    "AdaptiveSharpnessResult": "perturbation",
    "average_sharpness": "perturbation",
    "AverageSharpnessResult": "perturbation",
    "preconditioner_from_state": "preconditioning",
    "DiagonalScaledOperator": "preconditioning",
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
