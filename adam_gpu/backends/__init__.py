"""One thin launcher module per backend.

Each module defines ``unavailable_reason(device, dtype) -> str | None`` and
``adam_step(tensors: StepTensors, steps: list[float], hp: AdamHyperparameters) -> None``, which updates
params and moments in place. ``adam_gpu.dispatch`` lists them and imports them only when asked.
"""
