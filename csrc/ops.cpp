// Schemas of every lift_kernels op (one place), and the small Python module lift_kernels._C.
// Device kernels register themselves with TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "lowrank.h"

TORCH_LIBRARY(lift_kernels, m) {
  // Carry per-entry state from sorted flat indices old_idx to sorted new_idx; new entries get 0.
  m.def("remap_state(Tensor old_idx, Tensor new_idx, Tensor[] states) -> Tensor[]");
  // Sorted int32 flat indices of the k largest (or smallest) |W'| of each matrix of a batch W
  // (b, m, n), W' its rank-lra_rank approximation by an accurate randomized method seeded by `seed`.
  m.def("principal_weights(Tensor W, int k, int lra_rank, bool largest, int seed) -> Tensor");
  // Hooks of principal_weights' two steps, for tests and benchmarks: its block Krylov factors W ~= L R
  // of (b, m, n) W (fp32, fp64 for fp64 W), and its fused selection from given factors.
  m.def("_lowrank(Tensor W, int rank, int seed, int passes, int oversample) -> (Tensor, Tensor)");
  m.def("_topk_abs_product(Tensor L, Tensor R, int k, bool largest) -> Tensor");
  // AdamW on the selected entries params[i].view(-1)[idxs[i]] of every weight of a bucket, in place
  // (the reference op lift_kernels.reference.sparse_adamw_step documents the semantics). grads[i]
  // is dense (the weight's shape) or gathered (length k); masters is empty (no fp32 master copies)
  // or one entry per weight, None where that weight has none. step is the global step after increment.
  m.def("sparse_adamw_step(Tensor(a!)[] params, Tensor[] grads, Tensor[] idxs, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)?[] masters, int step, float lr, float beta1, float beta2, "
        "float eps, float weight_decay) -> ()");
}

namespace {

const std::vector<std::string> kOps = {"remap_state", "principal_weights", "_lowrank", "_topk_abs_product",
                                       "sparse_adamw_step"};

c10::DispatchKey key_for(const std::string& device) {
  if (device == "cpu") return c10::DispatchKey::CPU;
  if (device == "cuda") return c10::DispatchKey::CUDA;
  TORCH_CHECK(false, "device must be 'cpu' or 'cuda', got '", device, "'");
}

bool has_kernel(const std::string& op, const std::string& device) {
  auto handle = c10::Dispatcher::singleton().findSchema({"lift_kernels::" + op, ""});
  return handle.has_value() && handle->hasKernelForDispatchKey(key_for(device));
}

// "op:device" for every kernel this build registered, for lk.info().
std::vector<std::string> kernels() {
  std::vector<std::string> out;
  for (const auto& op : kOps)
    for (const char* dev : {"cpu", "cuda"})
      if (has_kernel(op, dev)) out.push_back(op + ":" + dev);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lift_kernels native ops (registered as torch.ops.lift_kernels.*)";
  m.def("has_kernel", &has_kernel, "whether op has a kernel for device ('cpu' or 'cuda')");
  m.def("kernels", &kernels, "the op:device kernels of this build");
  // principal_weights' built-in Krylov settings (tests check them against the Python reference's)
  m.attr("KRYLOV_PASSES") = lift::kKrylovPasses;
  m.attr("KRYLOV_OVERSAMPLE") = lift::kKrylovOversample;
}
