"""Every figure dynascope draws: ``Result.figure()``, the app's pages, the CLI exports and the report.

Results are plain data; the functions here draw them, one module per family:

* :mod:`.base` — the ``"dynascope"`` Plotly template (:data:`TEMPLATE`: white background, the Okabe–Ito
  colour-blind-safe palette, readable fonts, legends above the plot, log axes ticked at decades with at
  most :data:`MAX_LOG_LABELS` labels: :func:`log_axis`); :func:`use_paper_template` makes it a notebook's
  default;
* :mod:`.curvature`, :mod:`.gradients`, :mod:`.collapse`, :mod:`.connectivity`, :mod:`.ntk`,
  :mod:`.landscape` — one result → a figure, and ``{step: Result}`` → a frame (``*_frame``) → a figure
  across checkpoints (``*_figure``);
* :mod:`.training` — training curves and the phenomena pages (grokking, double descent, run overlays,
  learning-rate sweeps);
* :mod:`.across` — :func:`draw` (the drawer registered for a result's class, walking its bases, else
  :func:`generic`) and :func:`across_checkpoints` (one probe's ``{step: Result}``, every step on x), which
  :mod:`dynascope.trajectories` feeds from a result store;
* :mod:`.files` — :func:`write_html` / :func:`write_png` / :func:`write_figure` (HTML embeds plotly.js;
  PNG/SVG/PDF go through kaleido and a Chrome/Chromium browser).
"""

from .across import (
    ACROSS,
    DRAWERS,
    across_checkpoints,
    draw,
    generic,
    quantities_figure,
    relabel_steps,
    scalar_series,
)
from .base import MAX_LOG_LABELS, PALETTE, TEMPLATE, ExportError, log_axis, use_paper_template
from .collapse import NC_COLUMNS, nc_figure, nc_frame, nc_trajectory, neural_collapse
from .connectivity import lmc, lmc_layerwise
from .curvature import (
    DENSITY_DECADES,
    SHARPNESS_COLUMNS,
    adaptive_sharpness,
    add_threshold,
    average_sharpness,
    blockwise_spectra,
    condition_figure,
    density_figure,
    density_frame,
    hessian_density,
    hessian_diagonal,
    hessian_eigenvalues,
    hessian_trace,
    layerwise_hessian,
    schedule_frame,
    sharpness,
    sharpness_figure,
    sharpness_frame,
    sharpness_track,
    topk_figure,
    topk_frame,
    trace_figure,
    trace_frame,
)
from .files import IMAGE_FORMATS, figure_image, image_server, write_figure, write_html, write_png
from .gradients import COHERENCE_COLUMNS, coherence_figure, coherence_frame, gradient_coherence
from .landscape import loss_landscape, opposing_signals
from .ntk import ntk, ntk_trajectory
from .training import (
    double_descent_figure,
    dynamics_figure,
    dynamics_frame,
    grokking_figure,
    log_step,
    loss_figure,
    lr_sweep_figure,
    overlay_figure,
    width_sharpness_figure,
)

__all__ = [
    "blockwise_spectra",
    "ACROSS",
    "DRAWERS",
    "TEMPLATE",
    "PALETTE",
    "use_paper_template",
    "MAX_LOG_LABELS",
    "log_axis",
    "ExportError",
    "hessian_eigenvalues",
    "layerwise_hessian",
    "hessian_trace",
    "DENSITY_DECADES",
    "hessian_density",
    "sharpness",
    "adaptive_sharpness",
    "average_sharpness",
    "sharpness_track",
    "hessian_diagonal",
    "topk_frame",
    "topk_figure",
    "density_frame",
    "density_figure",
    "trace_frame",
    "trace_figure",
    "SHARPNESS_COLUMNS",
    "sharpness_frame",
    "schedule_frame",
    "sharpness_figure",
    "condition_figure",
    "add_threshold",
    "gradient_coherence",
    "COHERENCE_COLUMNS",
    "coherence_frame",
    "coherence_figure",
    "neural_collapse",
    "nc_trajectory",
    "NC_COLUMNS",
    "nc_frame",
    "nc_figure",
    "lmc",
    "lmc_layerwise",
    "ntk",
    "ntk_trajectory",
    "loss_landscape",
    "opposing_signals",
    "loss_figure",
    "log_step",
    "grokking_figure",
    "dynamics_frame",
    "dynamics_figure",
    "double_descent_figure",
    "overlay_figure",
    "lr_sweep_figure",
    "width_sharpness_figure",
    "generic",
    "draw",
    "scalar_series",
    "quantities_figure",
    "across_checkpoints",
    "relabel_steps",
    "IMAGE_FORMATS",
    "write_html",
    "figure_image",
    "image_server",
    "write_png",
    "write_figure",
]
