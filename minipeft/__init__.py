"""minipeft: parameter-efficient fine-tuning from first principles (NumPy, CuPy)."""
from .engine import Tensor, no_grad, enable_grad, tensor, saved_bytes, peak_saved_bytes, reset_peak_saved_bytes
from .random import manual_seed
from . import functional  # noqa: F401,E402  Tensor's operators, and the fast paths registered in minipeft.fast

__version__ = "0.1.0"
__all__ = [
    "Tensor", "tensor", "no_grad", "enable_grad", "saved_bytes", "peak_saved_bytes",
    "reset_peak_saved_bytes", "manual_seed", "__version__",
]
