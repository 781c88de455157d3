from iopfl.models.factory import StateDict, network_builder
from iopfl.models.unet import UNet, build_model

__all__ = ["StateDict", "UNet", "build_model", "network_builder"]
