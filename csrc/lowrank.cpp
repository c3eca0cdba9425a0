// Block Krylov low-rank factors; see lowrank.h and the Python twin lift_kernels/reference/lowrank.py,
// which documents the algorithm and its measured accuracy. The ATen calls follow the Python ones
// in the same order so the two agree to rounding on the CPU.
#include "lowrank.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <c10/util/Optional.h>

#include <limits>

namespace lift {
namespace {

// Products with W may use TF32 on CUDA (the measured agreement holds, and they are the bulk of
// the work); every other product runs in full fp32 (see exact_mm). torch has no scoped switch that
// enables TF32, so the global setting is set and restored around the product.
struct Tf32Scope {
  explicit Tf32Scope(bool on) : on_(on) {
    if (!on_) return;
    auto& ctx = at::globalContext();
    saved_ = ctx.float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL);
    ctx.setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL, at::Float32Precision::TF32);
  }
  ~Tf32Scope() {
    if (on_) at::globalContext().setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL, saved_);
  }
  Tf32Scope(const Tf32Scope&) = delete;
  Tf32Scope& operator=(const Tf32Scope&) = delete;

 private:
  bool on_;
  at::Float32Precision saved_ = at::Float32Precision::NONE;
};

// Orthonormalisation and Rayleigh-Ritz products: never TF32, whatever the user's global setting.
at::Tensor exact_mm(const at::Tensor& a, const at::Tensor& b) {
  at::NoTF32Guard full_fp32;
  return at::matmul(a, b);
}

// A X for a pass over the weights. X is in the work dtype. Half-precision weights on an accelerator
// stay in their dtype: X is split into hi + lo parts of that dtype and one GEMM with fp32 output
// (reading W once) gives A X to about 2^-16, finer than TF32, with no fp32 copy of W.
at::Tensor product(const at::Tensor& A, const at::Tensor& X) {
  if (A.scalar_type() == X.scalar_type()) {
    Tf32Scope tf32(A.is_cuda() && A.scalar_type() == at::kFloat);
    return at::matmul(A, X);
  }
  auto hi = X.to(A.scalar_type());
  auto lo = (X - hi.to(X.scalar_type())).to(A.scalar_type());
  const auto b = X.size(-1);
  auto Y = at::bmm(A, at::cat({hi, lo}, -1), X.scalar_type());
  return Y.narrow(-1, 0, b) + Y.narrow(-1, b, b);
}

double tiny_of(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? std::numeric_limits<double>::min() : std::numeric_limits<float>::min();
}

// Y divided by its largest |entry| per matrix: products and Gram matrices of weights of any scale then
// neither overflow nor underflow (A A^T Q scales as |A|^2), and no span or eigenvector changes.
at::Tensor unit_scaled(const at::Tensor& Y) {
  return Y / Y.abs().amax({-2, -1}, /*keepdim=*/true).clamp_min(tiny_of(Y));
}

// One CholeskyQR pass, projected out of span(K) first when K is given. The eps * trace shift keeps
// Cholesky alive on numerically rank-deficient blocks without changing their span.
at::Tensor cholqr_pass(const at::Tensor& Y0, const c10::optional<at::Tensor>& K) {
  at::Tensor Y = unit_scaled(K.has_value() ? Y0 - exact_mm(*K, exact_mm(K->mT(), Y0)) : Y0);
  auto G = exact_mm(Y.mT(), Y);
  const bool f64 = Y.scalar_type() == at::kDouble;
  const double eps = f64 ? std::numeric_limits<double>::epsilon() : std::numeric_limits<float>::epsilon();
  const double tiny = tiny_of(Y);
  auto shift = G.diagonal(0, -2, -1).sum(-1).mul(eps).add(tiny);
  G = G + shift.unsqueeze(-1).unsqueeze(-1) * at::eye(G.size(-1), G.options());
  auto C = std::get<0>(at::linalg_cholesky_ex(G));
  return at::linalg_solve_triangular(C.mT(), Y, /*upper=*/true, /*left=*/false);
}

at::Tensor orthonormalize(const at::Tensor& Y, const c10::optional<at::Tensor>& K = c10::nullopt) {
  return cholqr_pass(cholqr_pass(Y, K), K);
}

std::tuple<at::Tensor, at::Tensor> exact_lowrank(const at::Tensor& A, int64_t rank) {
  auto [U, S, Vh] = at::linalg_svd(A, /*full_matrices=*/false);
  return {U.narrow(-1, 0, rank) * S.narrow(-1, 0, rank).unsqueeze(-2), Vh.narrow(-2, 0, rank)};
}

at::ScalarType work_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

at::Generator seeded_generator(const at::Device& device, int64_t seed) {
  if (device.is_cpu()) return at::detail::createCPUGenerator(static_cast<uint64_t>(seed));
  auto gen = at::globalContext().getAcceleratorHooksInterface(device.type()).getNewGenerator(device.index());
  gen.set_current_seed(static_cast<uint64_t>(seed));
  return gen;
}

int64_t lowrank_workspace_bytes(int64_t m, int64_t n, int64_t rank, at::ScalarType dtype, bool on_cpu,
                                int64_t passes, int64_t oversample) {
  const int64_t elt = at::elementSize(work_dtype(dtype));
  const int64_t d = std::min(m, n), D = std::max(m, n);
  const int64_t b = rank + oversample, s = (passes / 2) * b;
  if (s >= d) return elt * (2 * d * D + d * d);  // SVD: a work copy and the factors
  const int64_t upcast = (on_cpu && dtype != work_dtype(dtype)) ? elt * d * D : 0;
  return upcast + elt * ((d + D) * s + 2 * s * s + 2 * D * b);  // K, Z, Gram/eigh, block temporaries
}

std::tuple<at::Tensor, at::Tensor> fast_lowrank(const at::Tensor& W, int64_t rank, at::Generator gen,
                                                int64_t passes, int64_t oversample) {
  TORCH_CHECK(W.dim() == 3, "fast_lowrank: W must be (b, m, n), got ", W.dim(), " dims");
  TORCH_CHECK(passes >= 2 && passes % 2 == 0, "fast_lowrank: passes must be an even number >= 2, got ", passes);
  TORCH_CHECK(oversample >= 0, "fast_lowrank: oversample must be >= 0, got ", oversample);
  const int64_t m = W.size(1), n = W.size(2);
  TORCH_CHECK(rank >= 1 && rank <= std::min(m, n), "fast_lowrank: lra_rank must be in [1, min(m, n)] = [1, ",
              std::min(m, n), "], got ", rank);
  const auto work = work_dtype(W.scalar_type());
  const int64_t b = rank + oversample;
  const int64_t s = (passes / 2) * b;  // Krylov basis width
  if (s >= std::min(m, n)) return exact_lowrank(W.to(work), rank);

  // On the CPU half-precision weights are upcast (a per-bucket copy); on an accelerator product()
  // reads them as they are.
  at::Tensor A = (W.is_cpu() || W.scalar_type() == at::kDouble) ? W.to(work) : W;
  const bool transposed = m > n;  // keep the basis on the short side
  if (transposed) A = A.mT();
  const int64_t batch = A.size(0), d = A.size(1), D = A.size(2);
  const auto opts = at::TensorOptions().dtype(work).device(W.device());

  auto omega = at::randn({batch, D, b}, gen, opts);
  auto K = at::empty({batch, d, s}, opts);
  auto Z = at::empty({batch, D, s}, opts);
  K.narrow(-1, 0, b).copy_(orthonormalize(product(A, omega)));
  Z.narrow(-1, 0, b).copy_(product(A.mT(), K.narrow(-1, 0, b)));
  for (int64_t j = b; j < s; j += b) {
    K.narrow(-1, j, b).copy_(orthonormalize(product(A, unit_scaled(Z.narrow(-1, j - b, b))), K.narrow(-1, 0, j)));
    Z.narrow(-1, j, b).copy_(product(A.mT(), K.narrow(-1, j, b)));
  }
  auto Zs = unit_scaled(Z);
  auto U = std::get<1>(at::linalg_eigh(exact_mm(Zs.mT(), Zs))).narrow(-1, s - rank, rank);
  auto L = exact_mm(K, U);
  auto R = exact_mm(Z, U).mT();
  if (transposed) return {R.mT().contiguous(), L.mT().contiguous()};
  return {L.contiguous(), R.contiguous()};
}

}  // namespace lift
