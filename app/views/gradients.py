"""Gradients: per-example gradient coherence and the gradient noise scale over checkpoints."""

from lib.trajectory_page import PAGES, show

show(PAGES["gradients"])
