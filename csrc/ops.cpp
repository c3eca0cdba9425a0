// The Python module lift_kernels._C: the kernels of csrc/cpu and csrc/cuda as plain functions named
// <kernel>_<device>, which lift_kernels/ops/native.py registers with torch.library.
//
// Why no TORCH_LIBRARY here: the ops must exist without this extension (LIFT_NO_NATIVE=1, or a
// build for another torch), where the reference and Triton backends still serve them, so their
// schemas are defined once, in Python (lift_kernels/ops/library.py). And LIFT_BACKEND may switch a
// device's kernel at run time; kernels registered from C++ at load could only be overridden with a
// dispatcher warning, while Python registrations are dropped and replaced cleanly.
#include <torch/extension.h>

#include "kernels.h"
#include "lowrank.h"
#include "principal_weights.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lift_kernels native kernels (registered as torch.ops.lift_kernels.* by lift_kernels.ops)";
  // The kernels run without the GIL: the selection may run buckets on several Python threads.
  const auto no_gil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("sparse_adamw_step_cpu", &lift::sparse_adamw_step_cpu, no_gil);
  m.def("sparse_adamw8bit_step_cpu", &lift::sparse_adamw8bit_step_cpu, no_gil);
  m.def("remap_state_cpu", &lift::remap_state_cpu, no_gil);
  m.def("sampled_weight_grad_cpu", &lift::sampled_weight_grad_cpu, no_gil);
  m.def("principal_weights_cpu", &lift::principal_weights_cpu, no_gil);
  m.def("topk_abs_product_cpu", &lift::topk_abs_product_cpu, no_gil);
  m.def("lowrank_cpu", &lift::lowrank_op, no_gil);
  // how the CPU kernels run in parallel (lk.info()["extension"])
  m.def("openmp_version", &lift::openmp_version);
  m.def("parallel_for_threads", &lift::parallel_for_threads, no_gil);
#ifdef LIFT_WITH_CUDA
  m.def("principal_weights_cuda", &lift::principal_weights_cuda, no_gil);
  m.def("topk_abs_product_cuda", &lift::topk_abs_product_cuda, no_gil);
  m.def("lowrank_cuda", &lift::lowrank_op, no_gil);
#endif
  // principal_weights' built-in Krylov settings (tests check them against the Python reference's)
  m.attr("KRYLOV_PASSES") = lift::kKrylovPasses;
  m.attr("KRYLOV_OVERSAMPLE") = lift::kKrylovOversample;
}
