"""One thin launcher module per backend: ``triton.py``, ``cupy.py``, ``torch.py``.

Each module defines:

- ``FEATURES``: the optional capabilities it has (the features of storage_formats.MOMENT_FORMATS: 8-bit moments;
  ``storage_formats.MOMENT_FEATURES`` where it steps every format);
- ``unavailable_reason(device, dtype) -> str | None``: None when it can update params of ``dtype`` on
  ``device``, else why not;
- ``adam_step(tensors, steps, hp, device_inputs=None) -> None``: one step over a checked ``StepTensors``,
  updating params, moments and masters in place; ``steps`` holds each tensor's incremented host step count,
  or is None when the counts (and lr, grad scale, found_inf) are on the device in ``device_inputs``
  (capturable steps).

``adam_gpu.dispatch`` lists them and imports one only when asked about it. The other modules here
(``tensor_table.py``, ``layout.py``, ``launch_config.py``, ``cuda_source.py``) are the kernels' shared helpers.
"""
