// The fp32 AdamW arithmetic of sparse_adamw_step on a contiguous tile of entries, shared by the CPU
// kernels of sparse_adamw_step (fp32 moments) and sparse_adamw8bit_step (8-bit moments), so both
// round every operation as torch.optim.AdamW's single-tensor path does (see sparse_adamw_step_cpu.cpp).
#pragma once

#include <ATen/Context.h>
#include <ATen/Version.h>

#include <cmath>
#include <cstdint>
#include <string>

namespace lift {
namespace adamw {

// The scalars torch.optim.AdamW derives from the hyperparameters in double precision, as the fp32
// values its tensor ops use (a Python float scalar reaches an fp32 kernel rounded to fp32).
struct Hyper {
  float decay;           // 1 - lr * weight_decay                     (w.mul_)
  float lerp_weight;     // 1 - beta1                                 (m.lerp_(g, weight))
  float lerp_rest;       // 1 - lerp_weight, in fp32 as torch.lerp computes it
  bool lerp_small;       // |weight| < 0.5: torch.lerp's formula from m rather than from g
  float beta2;           //                                           (v.mul_)
  float one_minus_beta2; //                                           (v.addcmul_(g, g, value))
  float bc2_sqrt;        // sqrt(1 - beta2^t)                         (v.sqrt() / bc2_sqrt)
  float eps;             //                                           (.add_(eps))
  float neg_step_size;   // -lr / (1 - beta1^t)                       (w.addcdiv_(m, denom, value))
};

inline Hyper make_hyper(int64_t step, double lr, double beta1, double beta2, double eps, double weight_decay) {
  const double t = static_cast<double>(step);
  Hyper h{};
  h.decay = static_cast<float>(1.0 - lr * weight_decay);
  h.lerp_weight = static_cast<float>(1.0 - beta1);
  h.lerp_rest = 1.0f - h.lerp_weight;
  h.lerp_small = std::abs(h.lerp_weight) < 0.5f;
  h.beta2 = static_cast<float>(beta2);
  h.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  h.bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, t)));
  h.eps = static_cast<float>(eps);
  h.neg_step_size = static_cast<float>(-(lr / (1.0 - std::pow(beta1, t))));
  return h;
}

// AdamW on n contiguous entries: w (weights or master, fp32), moments m and v, gathered grads g.
// kFma: round a*b+c once, as torch's vectorized lerp and addcmul kernels do when compiled with FMA.
template <bool kFma, bool kLerpSmall>
inline __attribute__((always_inline)) void adamw_tile_body(float* __restrict w, float* __restrict m,
                                                           float* __restrict v, const float* __restrict g,
                                                           int64_t n, const Hyper& h) {
  const float decay = h.decay, a = h.lerp_weight, rest = h.lerp_rest, b2 = h.beta2, c2 = h.one_minus_beta2;
  const float bc2 = h.bc2_sqrt, eps = h.eps, step = h.neg_step_size;
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i];
    const float wi = w[i] * decay;
    const float d = gi - m[i];
    float mi;
    if constexpr (kLerpSmall)
      mi = kFma ? std::fma(a, d, m[i]) : m[i] + a * d;
    else
      mi = kFma ? std::fma(-d, rest, gi) : gi - d * rest;
    const float vd = v[i] * b2;
    const float vi = kFma ? std::fma(c2 * gi, gi, vd) : vd + c2 * gi * gi;
    const float denom = std::sqrt(vi) / bc2 + eps;
    m[i] = mi;
    v[i] = vi;
    w[i] = wi + step * mi / denom;  // addcdiv: self + (value * t1) / t2
  }
}

using TileFn = void (*)(float*, float*, float*, const float*, int64_t, const Hyper&);

template <bool kLerpSmall>
void adamw_tile_plain(float* w, float* m, float* v, const float* g, int64_t n, const Hyper& h) {
  adamw_tile_body<false, kLerpSmall>(w, m, v, g, n, h);
}

#if defined(__x86_64__) || defined(__i386__)
// Compiled for AVX2 + FMA whatever the build's -march: it runs only where torch itself runs its
// AVX2/AVX512 kernels, which need both.
template <bool kLerpSmall>
__attribute__((target("avx2,fma"))) void adamw_tile_fma(float* w, float* m, float* v, const float* g,
                                                         int64_t n, const Hyper& h) {
  adamw_tile_body<true, kLerpSmall>(w, m, v, g, n, h);
}

inline bool torch_kernels_fuse_multiply_add() {
  static const bool fused = [] {
    const std::string cap = at::get_cpu_capability();
    return cap == "AVX2" || cap == "AVX512";
  }();
  return fused;
}
#endif

inline TileFn choose_tile_fn(const Hyper& h) {
#if defined(__x86_64__) || defined(__i386__)
  if (torch_kernels_fuse_multiply_add())
    return h.lerp_small ? &adamw_tile_fma<true> : &adamw_tile_fma<false>;
#endif
  return h.lerp_small ? &adamw_tile_plain<true> : &adamw_tile_plain<false>;
}

}  // namespace adamw
}  // namespace lift
