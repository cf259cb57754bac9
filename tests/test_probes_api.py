"""The public probe API: every exported name resolves to its object, never to a same-named submodule."""

from __future__ import annotations

import importlib
import pkgutil
import types

import dynascope.probes as probes


def test_exports_resolve_after_all_submodules_are_imported() -> None:
    # Importing a submodule sets it as an attribute of the package; an export with the same name
    # as a submodule would then be shadowed by the module (order-dependent breakage).
    for info in pkgutil.iter_modules(probes.__path__):
        importlib.import_module(f"dynascope.probes.{info.name}")
    for name, module in probes._EXPORTS.items():
        value = getattr(probes, name)
        assert not isinstance(value, types.ModuleType), f"probes.{name} is shadowed by a submodule"
        assert value is getattr(importlib.import_module(f"dynascope.probes.{module}"), name)


def test_design_contract_names_exist() -> None:
    for name in [
        "hessian_eigenvalues", "hessian_trace", "hessian_density", "empirical_ntk", "ntk_probe",
        "kernel_distance", "kernel_alignment", "sharpness", "gradient_coherence", "neural_collapse",
        "lmc_barrier", "weight_matching",
    ]:  # fmt: skip
        assert callable(getattr(probes, name)), name
