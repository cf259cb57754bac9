"""The empirical neural tangent kernel and what is measured on it.

* :mod:`.empirical` — ``Θ(x, x') = J(x) J(x')ᵀ`` formed in chunks (:func:`empirical_ntk`), its plan and
  cost model (:func:`plan_ntk`) and the matrix-free :class:`NTKOperator`.
* :mod:`.structure` — structured Jacobian factors of ``nn.Linear`` / ``nn.Conv2d`` layers.
* :mod:`.kernels` — centering, alignment, distance and velocity of kernels; parameter movement.
* :mod:`.diagnostics` — :func:`ntk_probe` (spectrum, label alignment) and :func:`ntk_trajectory`.

Public names are reached through :mod:`dynascope.probes` (``dynascope.probes.empirical_ntk`` ...).
"""
