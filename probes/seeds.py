"""Named offsets that derive a probe's independent random streams from its one ``seed`` argument.

Every random draw in the probes comes from a CPU ``torch.Generator`` seeded with ``seed`` or with
``seed`` plus one of these offsets, so that two streams of one call never coincide and a result is
reproduced exactly by its seed. Index-based streams (the ``i``-th layer block or mini-batch) use
``seed + i`` and are documented where they are drawn.
"""

from __future__ import annotations

#: Lanczos restart ``r`` after an invariant subspace draws its new direction from ``seed + r·7919``.
LANCZOS_RESTART_STRIDE = 7919
#: SLQ deflation: the top eigenvectors that are projected out come from Lanczos with ``seed + 1``.
DEFLATION_OFFSET = 1
#: NTK alignment: the Rademacher probes of ``‖K_c‖_F²`` use ``seed + 1`` (Lanczos starts from ``seed``).
NTK_PROBE_OFFSET = 1
#: Batch sharpness: the permutations that form disjoint mini-batches use ``seed + 104729`` (a prime far
#: from the per-batch Lanczos seeds ``seed + i``).
BATCH_PERMUTATION_OFFSET = 104729
#: Loss landscape: random direction ``j`` uses ``seed + 15485863 + j`` (``seed`` itself starts the Lanczos
#: run of Hessian directions in the same call).
LANDSCAPE_DIRECTION_OFFSET = 15485863

__all__ = [
    "BATCH_PERMUTATION_OFFSET",
    "DEFLATION_OFFSET",
    "LANCZOS_RESTART_STRIDE",
    "LANDSCAPE_DIRECTION_OFFSET",
    "NTK_PROBE_OFFSET",
]
