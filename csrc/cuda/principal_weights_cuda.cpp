// principal_weights on CUDA: the shared driver (../principal_weights.h), whose ATen calls run the
// block Krylov factorisation on cuBLAS/cuSOLVER, with the fused top-k kernels of
// topk_abs_product.cu. Everything is queued on the current stream; no host synchronisation.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <tuple>

#include "../kernels.h"
#include "../principal_weights.h"
#include "../radix_select.h"
#include "../topk_abs_product.h"
#include "topk_abs_product_cuda.h"

namespace lift {
namespace {

template <typename scalar_t>
void select_on_stream(const cuda::Factors<scalar_t>& f, int64_t k, at::Tensor& out) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::TensorOptions i64 = out.options().dtype(at::kLong);
  at::Tensor state = at::zeros({f.batch, 3}, i64);  // {prefix, mask, k_rem} per matrix
  state.select(1, 2).fill_(k);
  at::Tensor hist = at::zeros({f.batch, radix::kBins}, out.options().dtype(at::kInt));
  for (int p = 0; p < radix::num_digits<scalar_t>(); ++p) {
    cuda::launch_histogram(f, p, state.data_ptr<int64_t>(), hist.data_ptr<int32_t>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cuda::launch_choose_digit<scalar_t>(f.batch, p, hist.data_ptr<int32_t>(), state.data_ptr<int64_t>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor above = at::empty({f.batch, f.m * f.splits}, i64);
  at::Tensor ties = at::empty({f.batch, f.m * f.splits}, i64);
  cuda::launch_count(f, state.data_ptr<int64_t>(), above.data_ptr<int64_t>(), ties.data_ptr<int64_t>(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor offsets, ties_before;
  std::tie(offsets, ties_before) = row_output_offsets(above, ties, state.select(1, 2));
  offsets = offsets.contiguous();
  ties_before = ties_before.contiguous();
  cuda::launch_emit(f, state.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), ties_before.data_ptr<int64_t>(),
                    out.data_ptr<int32_t>(), k, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor topk_abs_product_cuda(const at::Tensor& L, const at::Tensor& R, int64_t k, bool largest) {
  check_topk_abs_product_args(L, R, k);
  TORCH_CHECK(L.is_cuda(), "topk_abs_product: L and R must be CUDA tensors");
  c10::cuda::CUDAGuard guard(L.device());
  const int64_t b = L.size(0), m = L.size(1), r = L.size(2), n = R.size(2);
  auto out = at::empty({b, k}, L.options().dtype(at::kInt));
  if (b == 0 || k == 0) return out;
  auto Lc = L.contiguous(), Rc = R.contiguous();
  AT_DISPATCH_FLOATING_TYPES(Lc.scalar_type(), "topk_abs_product_cuda", [&] {
    const int splits = cuda::column_splits<scalar_t>(b, m, n, L.get_device());
    const cuda::Factors<scalar_t> f{Lc.data_ptr<scalar_t>(), Rc.data_ptr<scalar_t>(), b, m, n, r, splits, largest};
    select_on_stream(f, k, out);
  });
  return out;
}

at::Tensor principal_weights_cuda(const at::Tensor& W, int64_t k, int64_t lra_rank, bool largest, int64_t seed) {
  c10::cuda::CUDAGuard guard(W.device());
  return principal_weights(W, k, lra_rank, largest, seed, &topk_abs_product_cuda);
}

}  // namespace lift
