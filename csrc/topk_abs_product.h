// The fused selection step of principal_weights: sorted int32 flat indices of the k largest (or
// smallest) |(L R)_ij| of each matrix of a batch, without forming L R (its tiles are recomputed in
// every pass). Exact k; ties at the threshold go to the lowest flat index. The device kernels live
// in csrc/cpu and csrc/cuda; what they share is here.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace lift {

// L (b, m, r), R (b, r, n) -> (b, k) int32.
using TopkAbsProductFn = at::Tensor (*)(const at::Tensor& L, const at::Tensor& R, int64_t k, bool largest);

// Shapes, dtypes (fp32 or fp64, the same for both), devices and k, with messages naming the argument.
void check_topk_abs_product_args(const at::Tensor& L, const at::Tensor& R, int64_t k);

// Where each row's selected entries start in the output (b, m), and how many ties at the threshold
// precede the row (b, m), from the per-row counts of keys above (b, m) and at (b, m) the threshold
// and the number of ties to take (b). int64 tensors on the counts' device.
std::tuple<at::Tensor, at::Tensor> row_output_offsets(const at::Tensor& above, const at::Tensor& ties,
                                                      const at::Tensor& ties_to_take);

}  // namespace lift
