// The device-independent driver of principal_weights and of the `_lowrank` test hook.
#include "principal_weights.h"

#include <algorithm>
#include <limits>

#include "lowrank.h"

namespace lift {
namespace {

// The batch is factorised in chunks whose Krylov workspace stays under an eighth of the batch's
// bytes (at least one matrix; small batches may use 64 MiB): a refresh then needs far less extra
// memory than the weights, whatever bucket sizes the caller passes.
int64_t chunk_size(const at::Tensor& W, int64_t lra_rank) {
  const int64_t per = lowrank_workspace_bytes(W.size(1), W.size(2), lra_rank, W.scalar_type(), W.is_cpu());
  const int64_t budget = std::max<int64_t>(W.numel() * W.element_size() / 8, int64_t(64) << 20);
  return std::max<int64_t>(1, budget / std::max<int64_t>(per, 1));
}

void check_args(const at::Tensor& W, int64_t k, int64_t lra_rank) {
  TORCH_CHECK(W.dim() == 3, "principal_weights: W must be a batch (b, m, n), got shape ", W.sizes());
  const auto t = W.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf,
              "principal_weights: W must be float32, float64, bfloat16 or float16, got ", t);
  const int64_t m = W.size(1), n = W.size(2);
  TORCH_CHECK(k >= 0 && k <= m * n, "principal_weights: k must be in [0, m*n] = [0, ", m * n, "], got ", k);
  TORCH_CHECK(lra_rank >= 1 && lra_rank <= std::min(m, n),
              "principal_weights: lra_rank must be in [1, min(m, n)] = [1, ", std::min(m, n), "], got ", lra_rank);
  TORCH_CHECK(m * n <= std::numeric_limits<int32_t>::max(), "principal_weights: W's m*n must fit int32 indices, got ",
              m, "x", n);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lowrank_op(const at::Tensor& W, int64_t rank, int64_t seed, int64_t passes,
                                              int64_t oversample) {
  return fast_lowrank(W, rank, seeded_generator(W.device(), seed), passes, oversample);
}

at::Tensor principal_weights(const at::Tensor& W, int64_t k, int64_t lra_rank, bool largest, int64_t seed,
                             TopkAbsProductFn topk_abs_product) {
  check_args(W, k, lra_rank);
  const int64_t b = W.size(0);
  auto out = at::empty({b, k}, W.options().dtype(at::kInt));
  if (b == 0 || k == 0) return out;
  auto gen = seeded_generator(W.device(), seed);
  const int64_t per = chunk_size(W, lra_rank);
  for (int64_t c = 0; c < b; c += per) {
    const int64_t len = std::min(per, b - c);
    auto [L, R] = fast_lowrank(W.narrow(0, c, len), lra_rank, gen);
    out.narrow(0, c, len).copy_(topk_abs_product(L, R, k, largest));
  }
  return out;
}

}  // namespace lift
