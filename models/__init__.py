"""Networks and the diffusion model built on them."""
from models.diffusion import DiffusionModel
from models.unet import DownBlock, TimeEmbedding, UNet, UpBlock

__all__ = ["DiffusionModel", "DownBlock", "TimeEmbedding", "UNet", "UpBlock"]
