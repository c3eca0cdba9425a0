// Launchers of the CUDA kernels of the fused top-k of |L R| (topk_abs_product.cu). Raw pointers,
// sizes and a stream only, so the kernels compile with nvcc alone (no torch headers); the torch glue
// is principal_weights_cuda.cpp.
//
// One selection runs, on one stream: for each radix digit, launch_histogram then
// launch_choose_digit; then launch_count, the row offsets (ATen, in the glue) and launch_emit.
// The per-matrix selection state is an int64 (batch, 3) array {prefix, mask, k_rem}, initialised
// to {0, 0, k}; `hist` is an int32 (batch, radix::kBins) array, zero before the first digit (each
// launch_choose_digit zeroes it again).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace lift {
namespace cuda {

// A batch of factor pairs, contiguous: L (batch, m, r), R (batch, r, n). Each row of L R is cut
// into `splits` column segments, so that small batches still fill the GPU; the count and emit
// passes work per (row, segment), numbered row * splits + segment (flat-index order).
template <typename scalar_t>
struct Factors {
  const scalar_t* L;
  const scalar_t* R;
  int64_t batch, m, n, r;
  int splits;
  bool largest;
};

// Column segments per row for this problem on `device`: enough thread blocks to fill every SM
// with as many blocks of scalar_t's tile kernels as fit on one at a time.
template <typename scalar_t>
int column_splits(int64_t batch, int64_t m, int64_t n, int device);

template <typename scalar_t>
void launch_histogram(const Factors<scalar_t>& f, int digit, const int64_t* state, int32_t* hist,
                      cudaStream_t stream);

template <typename scalar_t>
void launch_choose_digit(int64_t batch, int digit, int32_t* hist, int64_t* state, cudaStream_t stream);

// Per (row, segment): entries whose key is above the threshold key and equal to it, (batch, m * splits).
template <typename scalar_t>
void launch_count(const Factors<scalar_t>& f, const int64_t* state, int64_t* above, int64_t* ties,
                  cudaStream_t stream);

// Writes the k selected flat indices of each matrix, sorted, into out (batch, k); `offsets` and
// `ties_before` are (batch, m * splits): where each segment's entries start and how many ties
// precede it.
template <typename scalar_t>
void launch_emit(const Factors<scalar_t>& f, const int64_t* state, const int64_t* offsets,
                 const int64_t* ties_before, int32_t* out, int64_t k, cudaStream_t stream);

}  // namespace cuda
}  // namespace lift
