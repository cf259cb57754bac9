"""dynascope.models — architecture registry, safe checkpoint I/O and run folders.

build(name, **config) -> nn.Module          available() / register(name) / param_count / model_config
save_checkpoint(model, path, metadata=...)  load_checkpoint(path, model=None) -> LoadedCheckpoint
Run.create(path, model=..., dataset=...)    Run.open(path): checkpoints(), load_model(), metrics()
"""

from ..datasets.factory import UntrustedCodeError
from . import architectures, checkpoint_errors, checkpoints
from .architectures import *  # noqa: F403  (the registered architectures: architectures.__all__)
from .checkpoint_errors import *  # noqa: F403  (CheckpointError and one subclass per reason)
from .checkpoints import *  # noqa: F403  (save_checkpoint, load_checkpoint, ...: checkpoints.__all__)
from .imports import FolderScan, import_checkpoints, scan_checkpoint_folder
from .outputs import attach_logits_rule, logits_of
from .registry import available, build, model_config, normalize_config, param_count, register, weight_norm
from .runs import (
    CheckpointFile,
    CheckpointInfo,
    Run,
    RunError,
    optimizer_state_by_name,
    optimizer_state_to_torch,
)
from .schedules import SCHEDULE_TYPES, checkpoint_due, lr_at, torch_scheduler, validate_schedule
from .specs import build_from_spec, model_fingerprint, normalize_model_spec
from .weights import load_weights, tied_groups

__all__ = [
    *architectures.__all__,
    *checkpoint_errors.__all__,
    *checkpoints.__all__,
    "UntrustedCodeError",
    "build",
    "build_from_spec",
    "import_checkpoints",
    "scan_checkpoint_folder",
    "FolderScan",
    "normalize_model_spec",
    "model_fingerprint",
    "load_weights",
    "tied_groups",
    "logits_of",
    "attach_logits_rule",
    "register",
    "available",
    "param_count",
    "weight_norm",
    "model_config",
    "normalize_config",
    "Run",
    "RunError",
    "CheckpointInfo",
    "CheckpointFile",
    "optimizer_state_by_name",
    "optimizer_state_to_torch",
    "lr_at",
    "checkpoint_due",
    "validate_schedule",
    "torch_scheduler",
    "SCHEDULE_TYPES",
]
