"""The package version: a leaf module (imports nothing), so every layer may read it."""

__version__ = "0.1.0"
