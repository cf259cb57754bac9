"""dynascope: a training-dynamics analysis workbench for PyTorch."""

__version__ = "0.1.0"
