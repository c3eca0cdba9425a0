// The kernels of lift_kernels._C, one function per op and device, bound to Python in ops.cpp.
//
// The extension defines no torch ops: every op's schema, fake implementation and reference live in
// lift_kernels/ops/library.py, and lift_kernels/ops/backends.py registers these functions as the
// ops' CPU and CUDA kernels (via lift_kernels/ops/native.py). Each function takes the arguments of
// its op's schema, in order.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace lift {

// sparse_adamw_step; masters is empty (no master copies) or one entry per weight, None where none.
void sparse_adamw_step_cpu(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                           const std::vector<at::Tensor>& idxs, const std::vector<at::Tensor>& exp_avgs,
                           const std::vector<at::Tensor>& exp_avg_sqs,
                           const std::vector<std::optional<at::Tensor>>& masters, int64_t step, double lr,
                           double beta1, double beta2, double eps, double weight_decay);

// sparse_adamw8bit_step: moments as uint8 codes and fp32 block scales (csrc/cpu/sparse_adamw8bit_step_cpu.cpp).
void sparse_adamw8bit_step_cpu(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                               const std::vector<at::Tensor>& idxs, const std::vector<at::Tensor>& exp_avg_codes,
                               const std::vector<at::Tensor>& exp_avg_scales,
                               const std::vector<at::Tensor>& exp_avg_sq_codes,
                               const std::vector<at::Tensor>& exp_avg_sq_scales,
                               const std::vector<std::optional<at::Tensor>>& masters, const at::Tensor& exp_avg_book,
                               const at::Tensor& exp_avg_sq_book, int64_t step, double lr, double beta1,
                               double beta2, double eps, double weight_decay);

// sampled_weight_grad (csrc/cpu/sampled_weight_grad_cpu.cpp): fp32 values of grad_out.T @ x at idx.
at::Tensor sampled_weight_grad_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& idx);

std::vector<at::Tensor> remap_state_cpu(const at::Tensor& old_idx, const at::Tensor& new_idx,
                                        const std::vector<at::Tensor>& states);

// _principal_weights_seeded (W a batch (b, m, n)) and _topk_abs_product; _lowrank is lowrank_op
// (principal_weights.h), the same code on every device.
at::Tensor principal_weights_cpu(const at::Tensor& W, int64_t k, int64_t lra_rank, bool largest, int64_t seed);
at::Tensor topk_abs_product_cpu(const at::Tensor& L, const at::Tensor& R, int64_t k, bool largest);
// csrc/cpu/threads_cpu.cpp: _OPENMP of the build (0 without OpenMP), and the number of threads
// at::parallel_for runs from _C (1 without OpenMP, else torch.get_num_threads()).
int64_t openmp_version();
int64_t parallel_for_threads();

#ifdef LIFT_WITH_CUDA
at::Tensor principal_weights_cuda(const at::Tensor& W, int64_t k, int64_t lra_rank, bool largest, int64_t seed);
at::Tensor topk_abs_product_cuda(const at::Tensor& L, const at::Tensor& R, int64_t k, bool largest);
#endif

}  // namespace lift
