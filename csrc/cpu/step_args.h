// The checks both CPU AdamW steps (sparse_adamw_step, sparse_adamw8bit_step) make of one weight's
// params, idxs and grads, with the op's name in every message, so the two kernels refuse the same
// inputs with the same words.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace lift {
namespace step_args {

inline bool is_weight_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// params[i] and idxs[i]: a contiguous fp32/bf16/fp16 CPU weight and a contiguous 1-D int32 CPU index vector.
inline void check_weight(const char* op, size_t i, const at::Tensor& p, const at::Tensor& idx) {
  TORCH_CHECK(p.device().is_cpu(), op, "params[", i, "] must be a CPU tensor for this kernel, got ", p.device());
  TORCH_CHECK(is_weight_dtype(p.scalar_type()), op, "params[", i, "] must be fp32, bf16 or fp16, got ",
              p.scalar_type());
  TORCH_CHECK(p.is_contiguous(), op, "params[", i,
              "] must be contiguous (its entries are updated in place at flat indices)");
  TORCH_CHECK(idx.device().is_cpu() && idx.scalar_type() == at::kInt && idx.dim() == 1 && idx.is_contiguous(),
              op, "idxs[", i, "] must be a contiguous 1-D int32 CPU tensor of sorted flat indices, got ",
              idx.scalar_type(), " of shape ", idx.sizes(), " on ", idx.device());
}

// grads[i]: the weight's dense gradient or its k gathered entries; returns whether it is gathered.
inline bool check_grad(const char* op, size_t i, const at::Tensor& p, const at::Tensor& g, int64_t k) {
  TORCH_CHECK(g.device().is_cpu(), op, "grads[", i, "] must be a CPU tensor like params[", i, "], got ", g.device());
  TORCH_CHECK(is_weight_dtype(g.scalar_type()), op, "grads[", i, "] must be fp32, bf16 or fp16, got ",
              g.scalar_type());
  const bool gathered = g.sizes() != p.sizes();
  TORCH_CHECK(!gathered || (g.dim() == 1 && g.numel() == k), op, "grads[", i, "] must have the weight's shape ",
              p.sizes(), " (dense gradient) or be a vector of length k=", k, " (gathered gradient), got shape ",
              g.sizes());
  return gathered;
}

// idxs[i] (k >= 1, sorted): its first and last entries inside params[i]; returns the indices.
inline const int32_t* check_index_range(const char* op, size_t i, const at::Tensor& p, const at::Tensor& idx) {
  const int32_t* ix = idx.const_data_ptr<int32_t>();
  const int64_t k = idx.numel();
  TORCH_CHECK(ix[0] >= 0 && ix[k - 1] < p.numel(), op, "idxs[", i, "] must be sorted flat indices in [0, ",
              p.numel(), ") (the numel of params[", i, "]), got first ", ix[0], " and last ", ix[k - 1]);
  return ix;
}

}  // namespace step_args
}  // namespace lift
