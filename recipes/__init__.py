"""dynascope.recipes — phenomena reproduced on a CPU in minutes, and detectors for them.

``train(run_or_config, steps=..., ...)``          the training loop (run folder, resumable, seeded)
``RECIPES[name].run(out, small=False, seed=0)``   grokking, grokking_transformer, xor_grokking,
                                  double_descent, double_descent_nn, edge_of_stability,
                                  edge_of_stability_lr0.25, edge_of_stability_adam, lr_transfer,
                                  neural_collapse
``detect_grokking / detect_xor_grokking / detect_double_descent / detect_edge_of_stability /
detect_lr_transfer / detect_neural_collapse(run)``
                                                  evidence dataclasses
``ensure_demos(root)``                            small demo runs for the app (``DEMOS``)

Command line: ``python -m dynascope.recipes NAME --out DIR [--small] [--steps N] [--seed S]``.
"""

from ..models import weight_norm  # ‖θ‖₂ over the parameters, logged by train()
from .base import RECIPES, Recipe, register_recipe, run_recipe
from .demos import DEMOS, DemoSpec, ensure_demos
from .detectors import (
    DoubleDescentEvidence,
    EdgeOfStabilityEvidence,
    GrokkingEvidence,
    LrTransferEvidence,
    NeuralCollapseEvidence,
    XorGrokkingEvidence,
    detect,
    detect_double_descent,
    detect_edge_of_stability,
    detect_grokking,
    detect_lr_transfer,
    detect_neural_collapse,
    detect_xor_grokking,
    interpolation_threshold,
)
from .double_descent import double_descent, double_descent_nn, min_norm_fit
from .eos import SharpnessTracker, edge_of_stability, lambda_max
from .grokking import TRANSFORMER_CONFIG, grokking
from .lr_transfer import LR_TRANSFER_CONFIG, lr_transfer, read_lr_sweep
from .neural_collapse import NC_CONFIG, neural_collapse
from .train import checkpoint_schedule, evaluate, make_optimizer, train
from .xor_grokking import XOR_GROKKING_CONFIG, xor_grokking

__all__ = [
    "RECIPES",
    "Recipe",
    "register_recipe",
    "run_recipe",
    "train",
    "checkpoint_schedule",
    "evaluate",
    "make_optimizer",
    "weight_norm",
    "grokking",
    "TRANSFORMER_CONFIG",
    "double_descent",
    "double_descent_nn",
    "min_norm_fit",
    "edge_of_stability",
    "lambda_max",
    "SharpnessTracker",
    "detect",
    "detect_grokking",
    "detect_xor_grokking",
    "XorGrokkingEvidence",
    "xor_grokking",
    "XOR_GROKKING_CONFIG",
    "lr_transfer",
    "LR_TRANSFER_CONFIG",
    "read_lr_sweep",
    "neural_collapse",
    "NC_CONFIG",
    "detect_lr_transfer",
    "LrTransferEvidence",
    "detect_neural_collapse",
    "NeuralCollapseEvidence",
    "detect_double_descent",
    "interpolation_threshold",
    "detect_edge_of_stability",
    "GrokkingEvidence",
    "DoubleDescentEvidence",
    "EdgeOfStabilityEvidence",
    "DEMOS",
    "DemoSpec",
    "ensure_demos",
]
