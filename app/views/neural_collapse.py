"""Neural collapse: NC1–NC4 of the penultimate features and the classifier over checkpoints."""

from lib.trajectory_page import PAGES, show

show(PAGES["neural_collapse"])
