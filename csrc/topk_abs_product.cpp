// Device-independent parts of the fused top-k selection (see topk_abs_product.h).
#include "topk_abs_product.h"

#include <limits>

namespace lift {

void check_topk_abs_product_args(const at::Tensor& L, const at::Tensor& R, int64_t k) {
  TORCH_CHECK(L.dim() == 3 && R.dim() == 3, "topk_abs_product: L must be (b, m, r) and R (b, r, n), got ",
              L.sizes(), " and ", R.sizes());
  TORCH_CHECK(L.size(0) == R.size(0) && L.size(2) == R.size(1), "topk_abs_product: L ", L.sizes(),
              " and R ", R.sizes(), " do not chain");
  TORCH_CHECK(L.scalar_type() == R.scalar_type() &&
                  (L.scalar_type() == at::kFloat || L.scalar_type() == at::kDouble),
              "topk_abs_product: L and R must both be float32 or float64, got ", L.scalar_type(), " and ",
              R.scalar_type());
  TORCH_CHECK(L.device() == R.device(), "topk_abs_product: L and R must be on one device");
  const int64_t m = L.size(1), n = R.size(2);
  TORCH_CHECK(m * n <= std::numeric_limits<int32_t>::max(),
              "topk_abs_product: m*n must fit int32 flat indices, got ", m, "x", n);
  TORCH_CHECK(k >= 0 && k <= m * n, "topk_abs_product: k must be in [0, m*n] = [0, ", m * n, "], got ", k);
}

std::tuple<at::Tensor, at::Tensor> row_output_offsets(const at::Tensor& above, const at::Tensor& ties,
                                                      const at::Tensor& ties_to_take) {
  auto ties_before = at::cumsum(ties, 1) - ties;
  auto taken = at::clamp_min(at::minimum(ties, ties_to_take.unsqueeze(1) - ties_before), 0);
  auto kept = above + taken;
  return {at::cumsum(kept, 1) - kept, ties_before};
}

}  // namespace lift
