"""The public probe API: every exported name resolves to its object, never to a same-named submodule."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import types

import dynascope.probes as probes


def test_exports_resolve_after_all_submodules_are_imported() -> None:
    # Importing a submodule sets it as an attribute of the package; an export with the same name
    # as a submodule would then be shadowed by the module (order-dependent breakage).
    for info in pkgutil.walk_packages(probes.__path__, prefix="dynascope.probes."):
        importlib.import_module(info.name)
    for name, module in probes._EXPORTS.items():
        value = getattr(probes, name)
        assert not isinstance(value, types.ModuleType), f"probes.{name} is shadowed by a submodule"
        assert value is getattr(importlib.import_module(f"dynascope.probes.{module}"), name)


def test_no_submodule_carries_a_public_name() -> None:
    submodules = {info.name for info in pkgutil.iter_modules(probes.__path__)}
    assert {"curvature_sharpness", "perturbation", "ntk"} <= submodules
    assert not submodules & set(probes._EXPORTS), "a submodule named like an export shadows it"


def test_curvature_sharpness_module_imported_first_leaves_the_function() -> None:
    # a fresh interpreter: the submodule is imported before the public name is ever looked up
    code = (
        "from dynascope.probes.curvature_sharpness import SharpnessResult\n"
        "from dynascope.probes.ntk.empirical import NTKOperator\n"
        "import dynascope.probes, types\n"
        "assert not isinstance(dynascope.probes.sharpness, types.ModuleType)\n"
        "assert dynascope.probes.sharpness.__name__ == 'sharpness'\n"
        "assert dynascope.probes.SharpnessResult is SharpnessResult\n"
        "assert dynascope.probes.NTKOperator is NTKOperator\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_design_contract_names_exist() -> None:
    for name in [
        "hessian_eigenvalues", "hessian_trace", "hessian_density", "empirical_ntk", "ntk_probe",
        "kernel_distance", "kernel_alignment", "sharpness", "gradient_coherence", "neural_collapse",
        "lmc_barrier", "weight_matching", "hessian_diagonal", "loss_landscape", "opposing_signals",
    ]:  # fmt: skip
        assert callable(getattr(probes, name)), name


def test_nan_weights_give_a_clear_error_in_every_probe() -> None:
    import pytest
    import torch

    from dynascope.models import build

    model = build("mlp", in_dim=4, width=8, depth=1, out_dim=3)
    other = build("mlp", in_dim=4, width=8, depth=1, out_dim=3, seed=1)
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    calls = {
        "hessian_eigenvalues": lambda: probes.hessian_eigenvalues(model, (x, y), k=2),
        "hessian_trace": lambda: probes.hessian_trace(model, (x, y), n_matvecs=6),
        "hessian_density": lambda: probes.hessian_density(model, (x, y), n_probes=1, lanczos_steps=4),
        "sharpness": lambda: probes.sharpness(model, (x, y)),
        "gradient_coherence": lambda: probes.gradient_coherence(model, (x, y)),
        "empirical_ntk": lambda: probes.empirical_ntk(model, x),
        "ntk_probe": lambda: probes.ntk_probe(model, (x, y), k=2),
        "neural_collapse": lambda: probes.neural_collapse(model, (x, y)),
        "lmc_barrier": lambda: probes.lmc_barrier(other, model, (x, y), n_points=3),
    }
    for call in calls.values():
        with pytest.raises(ValueError, match=r"non-finite \(NaN/Inf\) values in: head\.weight \(1 of 24\)"):
            call()
