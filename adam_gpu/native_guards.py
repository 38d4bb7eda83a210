"""An optional compiled form of the per-tensor part of a reused step's proof (adam_gpu.step_signature).

A reused step proves its kept tensors (params, moments, masters, absmaxes, step counts) are the objects of its last
full check, unmoved and unchanged in layout, and its grads alike to that check's. In Python that is a data pointer
read, a TensorGuards check and a weak-reference read a tensor, the floor of the eager step with many tensors;
``Snapshot`` does the same reads in one C++ call (what each costs: docs/benchmarks.md, "Host time of a step"). It
holds each kept tensor's TensorImpl weakly (a tensor the user drops is freed) with the fields a kernel depends on
(data pointer, dtype, device, dispatch keys, requires_grad, sizes, strides), and the grads' fields but their address.

It is built with torch's C++ extension loader (a C++ compiler, ninja and torch's headers; once, then cached by
torch) when ``ADAM_GPU_NATIVE_GUARDS=1`` is set, and never otherwise: without it, or where the build fails, the
Python proof runs, and the tests run both (tests/test_native_guards.py).
"""

from __future__ import annotations

import functools
import os
from typing import Any

ENV_VAR = "ADAM_GPU_NATIVE_GUARDS"

_SOURCE = r"""
#include <torch/extension.h>
#include <torch/csrc/autograd/python_variable.h>

#include <vector>

namespace {

using Impl = c10::TensorImpl;
using WeakImpl = c10::weak_intrusive_ptr<Impl, c10::UndefinedTensorImpl>;

// What a kernel depends on of a tensor besides its values (the address apart, for grads).
struct Fields {
  const void* data;
  c10::ScalarType dtype;
  c10::Device device;
  uint64_t keys;
  bool requires_grad;
  std::vector<int64_t> sizes, strides;

  explicit Fields(const Impl& impl)
      : data(impl.data()),
        dtype(c10::typeMetaToScalarType(impl.dtype())),
        device(impl.device()),
        keys(impl.key_set().raw_repr()),
        requires_grad(impl.requires_grad()),
        sizes(impl.sizes().vec()),
        strides(impl.strides().vec()) {}

  // Whether `impl` has these fields (`with_address`: its data pointer too).
  bool alike(const Impl& impl, bool with_address) const {
    if (impl.is_nested() || impl.layout() != c10::kStrided) return false;  // (no strides to read)
    if (with_address && impl.data() != data) return false;
    return c10::typeMetaToScalarType(impl.dtype()) == dtype && impl.device() == device &&
           impl.key_set().raw_repr() == keys && impl.requires_grad() == requires_grad &&
           impl.sizes() == c10::IntArrayRef(sizes) && impl.strides() == c10::IntArrayRef(strides);
  }
};

const Impl* impl_of(PyObject* object) {
  if (!THPVariable_Check(object)) return nullptr;
  return THPVariable_Unpack(object).unsafeGetTensorImpl();
}

class Snapshot {
 public:
  Snapshot(const std::vector<at::Tensor>& kept, const std::vector<at::Tensor>& grads) {
    for (const auto& tensor : kept) {
      kept_.emplace_back(tensor.getIntrusivePtr());
      kept_fields_.emplace_back(*tensor.unsafeGetTensorImpl());
    }
    for (const auto& tensor : grads) grad_fields_.emplace_back(*tensor.unsafeGetTensorImpl());
  }

  // The grads' data pointers where `params` are the first kept tensors, every kept tensor is alive and alike in
  // all its fields, and `grads` are alike in all but their address; else None.
  py::object holds(py::list params, py::list grads) const {
    const size_t count = py::len(params);
    if (count > kept_.size() || py::len(grads) != grad_fields_.size()) return py::none();
    for (size_t i = 0; i < kept_.size(); ++i) {
      if (kept_[i].expired()) return py::none();
      // (Alive: nothing can free it while this call holds the GIL.)
      const Impl* impl = kept_[i]._unsafe_get_target();
      if (i < count && impl_of(PyList_GET_ITEM(params.ptr(), i)) != impl) return py::none();
      if (!kept_fields_[i].alike(*impl, true)) return py::none();
    }
    py::tuple pointers(grad_fields_.size());
    for (size_t i = 0; i < grad_fields_.size(); ++i) {
      const Impl* impl = impl_of(PyList_GET_ITEM(grads.ptr(), i));
      if (impl == nullptr || !grad_fields_[i].alike(*impl, false)) return py::none();
      pointers[i] = py::int_(reinterpret_cast<intptr_t>(impl->data()));
    }
    return std::move(pointers);
  }

 private:
  std::vector<WeakImpl> kept_;
  std::vector<Fields> kept_fields_, grad_fields_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Snapshot>(m, "Snapshot")
      .def(py::init<const std::vector<at::Tensor>&, const std::vector<at::Tensor>&>())
      .def("holds", &Snapshot::holds);
}
"""


@functools.cache
def snapshot_type() -> Any:
    """The compiled ``Snapshot`` class, or None: not asked for (``ADAM_GPU_NATIVE_GUARDS`` unset), or not buildable
    here (``build_error`` says why)."""
    if os.environ.get(ENV_VAR, "0") != "1":
        return None
    try:
        return _build().Snapshot
    except Exception as error:  # (no compiler, no headers, a torch whose C++ API differs: the Python proof runs)
        _build_errors.append(f"{type(error).__name__}: {error}")
        return None


_build_errors: list[str] = []


def build_error() -> str | None:
    """Why the compiled snapshot could not be built, if it was asked for and failed."""
    return _build_errors[-1] if _build_errors else None


def _build() -> Any:
    from torch.utils.cpp_extension import load_inline

    return load_inline("adam_gpu_native_guards", cpp_sources=_SOURCE, extra_cflags=["-O2"], verbose=False)
