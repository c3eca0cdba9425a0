// principal_weights for any device: block Krylov factors (lowrank.h) of the batch, chunk by chunk,
// then the device's fused top-k of |L R| (topk_abs_product.h).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

#include "topk_abs_product.h"

namespace lift {

at::Tensor principal_weights(const at::Tensor& W, int64_t k, int64_t lra_rank, bool largest, int64_t seed,
                             TopkAbsProductFn topk_abs_product);

// The `_lowrank` op (a test and benchmark hook): fast_lowrank with a generator seeded by `seed`.
std::tuple<at::Tensor, at::Tensor> lowrank_op(const at::Tensor& W, int64_t rank, int64_t seed, int64_t passes,
                                              int64_t oversample);

}  // namespace lift
