"""vlkd: distil diffusion models into few-step samplers and CLIP models into small encoders."""

from vlkd.errors import VlkdError

__version__ = "0.1.0"
__all__ = ["VlkdError", "__version__"]
