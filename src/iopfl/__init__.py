"""iopfl: inside-outside personalized federated learning for medical image segmentation."""

from pathlib import Path

__version__ = "0.1.0"

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # the YAML configs shipped as package data
