// Rank-r factors W ~= L R of a batch of matrices by randomized block Krylov: the algorithm of
// lift_kernels/reference/lowrank.py (fast_lowrank), written once in ATen for every device.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace lift {

// Defaults of lift_kernels/reference/lowrank.py (DEFAULT_PASSES, DEFAULT_OVERSAMPLE); the tests
// compare this code with that one, so a change to one side alone fails them.
constexpr int64_t kKrylovPasses = 12;
constexpr int64_t kKrylovOversample = 48;

// L (b, m, rank), R (b, rank, n) in fp32 (fp64 for fp64 W) for W (b, m, n); the random start is
// drawn from `gen` (a generator of W's device). Exact SVD when the Krylov space would be as wide as W.
std::tuple<at::Tensor, at::Tensor> fast_lowrank(const at::Tensor& W, int64_t rank, at::Generator gen,
                                                int64_t passes = kKrylovPasses,
                                                int64_t oversample = kKrylovOversample);

// A new generator of `device` seeded with `seed` (for W on the CPU: the stream of
// torch.Generator().manual_seed(seed)).
at::Generator seeded_generator(const at::Device& device, int64_t seed);

// Bytes fast_lowrank allocates beyond its inputs and outputs for one (m, n) matrix of `dtype`
// (an estimate within a small factor: the Krylov basis and its images, or the SVD's factors).
int64_t lowrank_workspace_bytes(int64_t m, int64_t n, int64_t rank, at::ScalarType dtype, bool on_cpu,
                                int64_t passes = kKrylovPasses, int64_t oversample = kKrylovOversample);

}  // namespace lift
