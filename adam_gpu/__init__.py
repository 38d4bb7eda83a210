"""adam-gpu: single-pass fused Adam/AdamW kernels (Triton, CUDA C) behind a PyTorch-native API.

Importing this package imports no kernel, touches no GPU and compiles nothing: backends are loaded
and kernels compiled on the first step that needs them.
"""

from adam_gpu.dispatch import BACKENDS, BackendUnavailableError
from adam_gpu.functional import fused_adam
from adam_gpu.hyperparameters import AdamHyperparameters
from adam_gpu.optim import FusedAdam, FusedAdamW

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "AdamHyperparameters",
    "BackendUnavailableError",
    "FusedAdam",
    "FusedAdamW",
    "fused_adam",
    "__version__",
]
