// sampled_weight_grad on the CPU: values[j] = sum_t grad_out[t, r_j] * x[t, c_j] (r_j = idx[j] / n,
// c_j = idx[j] % n), an SDDMM, accumulated in fp32.
//
// Both operands are first transposed, once per call, into fp32 panels of G (m, Tp) and X (n, Tp),
// T zero-padded to Tp, a multiple of kLanes, so that each entry is a sum of contiguous dot products,
// which vectorize; converting bf16/fp16/fp64 to fp32 happens there, once per element instead of once
// per entry that reads it. fp64 inputs are rounded to fp32 as the reference does (grad_out.float());
// the result is fp32 in every case.
//
// Cache reuse: X[c] is read by every selected entry of column c, and those lie in many rows, far
// apart in a sorted idx; reading X[c] whole for each entry would stream most of X from memory again
// for every few rows. Instead T is cut into tiles of tile_t(n) rows, and each panel is stored tile by tile
// ((Tp / tile, rows, tile)): a thread takes a chunk of kChunk entries and runs every tile over the
// whole chunk, so the tile of X (about kTileBytes) stays in its core's cache while the chunk's rows
// read it, and the chunk's partial sums (values[j]) stay close too.
//
// Summation order: within a tile, an entry sums its products in kLanes interleaved fp32 partial sums
// (lane l takes t = l, l + kLanes, ...) and adds the lanes in a fixed tree; the tiles' sums are then
// added in order of t. That order depends on T and n alone, never on which thread computes the entry,
// which chunk holds it or which entries share its pass, so any thread count and any index order give
// the same bits for an entry. The padding adds products 0 * 0.
//
// LIFT's indices are sorted, so entries come in runs of one row: up to kGroup consecutive entries
// that share a row are computed in one pass that loads G[r] once for all of them (fewer loads per
// multiply-add); an entry outside a run takes the same pass alone. Unsorted or repeated indices are
// computed correctly, only without that sharing.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <cstdint>
#include <string>
#include <vector>

#include "../kernels.h"

namespace lift {
namespace {

constexpr int64_t kLanes = 16;   // partial sums per entry: two AVX2 vectors, four SSE ones
constexpr int kGroup = 4;        // entries of one row per pass (G[r] loaded once for them)
constexpr int64_t kBlock = 16;   // transpose tile: kBlock x kBlock elements
constexpr int64_t kWork = int64_t(1) << 16;  // multiply-adds below which a range runs on one thread
constexpr int64_t kChunk = int64_t(1) << 14;  // entries that run through all tiles together
constexpr int64_t kTileBytes = int64_t(1) << 21;  // one tile of the X panel: what should stay in a core's cache
constexpr int64_t kMinTile = 128;  // rows of T per tile at least: the lanes' fold is paid once per tile

// Rows of T per tile for x of n columns: X's tile near kTileBytes, a multiple of kLanes, within [kMinTile, Tp].
int64_t tile_t(int64_t n, int64_t Tp) {
  const int64_t fit = kTileBytes / (4 * std::max<int64_t>(n, 1)) / kLanes * kLanes;
  return std::min(Tp, std::max(kMinTile, fit));
}

// Where element (row, t) of a panel of `rows` rows lies: tile by tile, each tile (rows, its width).
inline int64_t panel_offset(int64_t row, int64_t t, int64_t rows, int64_t tile, int64_t Tp) {
  const int64_t t0 = t / tile * tile;
  return t0 * rows + row * std::min(tile, Tp - t0) + (t - t0);
}

// (T, cols) with any strides -> the panel of `cols` rows (see panel_offset), fp32, zero-padded from T
// to Tp. Blocks of kBlock x kBlock keep both the strided reads and the writes within a few cache lines.
template <typename S>
void transpose_into(const at::Tensor& src, float* dst, int64_t Tp, int64_t tile) {
  const int64_t T = src.size(0), cols = src.size(1), st = src.stride(0), sc = src.stride(1);
  const S* p = src.const_data_ptr<S>();
  const int64_t col_blocks = (cols + kBlock - 1) / kBlock;
  at::parallel_for(0, col_blocks, std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(Tp, 1)),
                   [&](int64_t b0, int64_t b1) {
    for (int64_t cb = b0; cb < b1; ++cb) {
      const int64_t c0 = cb * kBlock, c1 = std::min(cols, c0 + kBlock);
      for (int64_t t0 = 0; t0 < T; t0 += kBlock) {
        const int64_t t1 = std::min(T, t0 + kBlock);
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t t = t0; t < t1; ++t) dst[panel_offset(c, t, cols, tile, Tp)] = static_cast<float>(p[t * st + c * sc]);
      }
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t t = T; t < Tp; ++t) dst[panel_offset(c, t, cols, tile, Tp)] = 0.0f;
    }
  });
}

void transpose_any(const at::Tensor& src, float* dst, int64_t Tp, int64_t tile) {
  switch (src.scalar_type()) {
    case at::kFloat: return transpose_into<float>(src, dst, Tp, tile);
    case at::kBFloat16: return transpose_into<c10::BFloat16>(src, dst, Tp, tile);
    case at::kHalf: return transpose_into<c10::Half>(src, dst, Tp, tile);
    default: return transpose_into<double>(src, dst, Tp, tile);
  }
}

// kLanes fp32 lanes as two 8-wide vectors (GCC/Clang vector extension: one AVX register each, or
// two SSE ones where the plain form runs).
using Vec8 = float __attribute__((vector_size(32)));

inline Vec8 load8(const float* p) {
  Vec8 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

// The lanes of one entry (lo holds lanes 0..7, hi 8..15) added in a fixed tree: l + 8, + 4, + 2, + 1.
inline float fold(Vec8 lo, Vec8 hi) {
  const Vec8 s8 = lo + hi;
  const float s4[4] = {s8[0] + s8[4], s8[1] + s8[5], s8[2] + s8[6], s8[3] + s8[7]};
  const float s2[2] = {s4[0] + s4[2], s4[1] + s4[3]};
  return s2[0] + s2[1];
}
static_assert(kLanes == 16, "fold and dots_body hold the lanes in two 8-wide vectors");

// R entries of one row: out[i] = a . b[i] over Tp (a multiple of kLanes). Each entry has its own
// lanes, updated in the same order whatever R is. kFma rounds each multiply-add once; the plain form
// rounds the product and the sum (the build has -ffp-contract=off).
template <int R, typename MulAdd>
inline __attribute__((always_inline)) void dots_body(const float* __restrict a, const float* const* b, int64_t Tp,
                                                     float* out, MulAdd mul_add) {
  Vec8 lo[R], hi[R];
  const float* __restrict br[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    lo[r] = Vec8{};
    hi[r] = Vec8{};
    br[r] = b[r];
  }
  for (int64_t t = 0; t < Tp; t += kLanes) {
    const Vec8 a0 = load8(a + t), a1 = load8(a + t + 8);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      lo[r] = mul_add(a0, load8(br[r] + t), lo[r]);
      hi[r] = mul_add(a1, load8(br[r] + t + 8), hi[r]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) out[r] = fold(lo[r], hi[r]);
}

using DotsFn = void (*)(const float*, const float* const*, int64_t, float*);

template <int R>
void dots_plain(const float* a, const float* const* b, int64_t Tp, float* out) {
  dots_body<R>(a, b, Tp, out, [](Vec8 x, Vec8 y, Vec8 acc) { return acc + x * y; });
}

#if defined(__x86_64__) || defined(__i386__)
// AVX2 + FMA whatever the build's -march, chosen where torch itself runs its AVX2/AVX512 kernels.
template <int R>
__attribute__((target("avx2,fma"))) void dots_fma(const float* a, const float* const* b, int64_t Tp, float* out) {
  dots_body<R>(a, b, Tp, out, [](Vec8 x, Vec8 y, Vec8 acc) __attribute__((target("avx2,fma"))) {
    return static_cast<Vec8>(_mm256_fmadd_ps(x, y, acc));
  });
}

bool has_avx2_fma() {
  static const bool yes = [] {
    const std::string cap = at::get_cpu_capability();
    return cap == "AVX2" || cap == "AVX512";
  }();
  return yes;
}
#endif

struct Dots {
  DotsFn by_group[kGroup + 1];  // index: entries in the pass (1..kGroup)
};

Dots choose_dots() {
#if defined(__x86_64__) || defined(__i386__)
  if (has_avx2_fma()) return {{nullptr, &dots_fma<1>, &dots_fma<2>, &dots_fma<3>, &dots_fma<4>}};
#endif
  return {{nullptr, &dots_plain<1>, &dots_plain<2>, &dots_plain<3>, &dots_plain<4>}};
}
static_assert(kGroup == 4, "choose_dots lists one function per group size");

constexpr const char* kOp = "sampled_weight_grad: ";

bool is_floating(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

}  // namespace

at::Tensor sampled_weight_grad_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& idx) {
  // The reference's checks, in its order and words (lift_kernels/ops/library.py), as ValueError.
  TORCH_CHECK_VALUE(grad_out.dim() == 2, kOp, "grad_out must be 2-D (T, m), got shape ", grad_out.sizes());
  TORCH_CHECK_VALUE(x.dim() == 2, kOp, "x must be 2-D (T, n), got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(0) == grad_out.size(0), kOp, "x and grad_out must have the same number of rows T, got x ",
                    x.sizes(), " and grad_out ", grad_out.sizes());
  TORCH_CHECK_VALUE(is_floating(grad_out.scalar_type()), kOp,
                    "grad_out must be a floating tensor (fp32, bf16, fp16, fp64), got ", grad_out.scalar_type());
  TORCH_CHECK_VALUE(is_floating(x.scalar_type()), kOp, "x must be a floating tensor (fp32, bf16, fp16, fp64), got ",
                    x.scalar_type());
  TORCH_CHECK_VALUE(idx.scalar_type() == at::kInt && idx.dim() == 1, kOp,
                    "idx must be a 1-D int32 tensor of flat indices, got ", idx.scalar_type(), " of shape ",
                    idx.sizes(), " (pass idx.to(torch.int32))");
  TORCH_CHECK_VALUE(grad_out.device().is_cpu() && x.device().is_cpu() && idx.device().is_cpu(), kOp,
                    "grad_out, x and idx must be CPU tensors for this kernel, got ", grad_out.device(), ", ",
                    x.device(), " and ", idx.device());

  const int64_t T = grad_out.size(0), m = grad_out.size(1), n = x.size(1), k = idx.numel();
  const at::Tensor ix = idx.contiguous();
  const int32_t* ip = ix.const_data_ptr<int32_t>();
  if (k > 0) {
    const auto [lo, hi] = std::minmax_element(ip, ip + k);
    TORCH_CHECK_VALUE(*lo >= 0 && *hi < m * n, kOp, "idx must lie in [0, m*n) = [0, ", m * n, "), got values in [",
                      *lo, ", ", *hi, "]");
  }
  at::Tensor out = at::zeros({k}, grad_out.options().dtype(at::kFloat));
  if (k == 0 || T == 0) return out;

  const int64_t Tp = (T + kLanes - 1) / kLanes * kLanes;
  const int64_t tile = tile_t(n, Tp);
  at::Tensor panels = at::empty({(m + n) * Tp}, grad_out.options().dtype(at::kFloat));
  float* G = panels.data_ptr<float>();
  float* X = G + m * Tp;
  transpose_any(grad_out, G, Tp, tile);
  transpose_any(x, X, Tp, tile);

  float* values = out.data_ptr<float>();
  const Dots dots = choose_dots();
  at::parallel_for(0, k, std::max<int64_t>(1, kWork / Tp), [&](int64_t begin, int64_t end) {
    std::vector<int32_t> rows(std::min(kChunk, end - begin)), cols(rows.size());  // a chunk's entries,
                                                                                 // decoded once for all tiles
    const float* b[kGroup];
    float partial[kGroup];
    for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
      const int64_t c1 = std::min(end, c0 + kChunk);
      for (int64_t j = c0; j < c1; ++j) {
        rows[j - c0] = ip[j] / n;
        cols[j - c0] = ip[j] - rows[j - c0] * n;
      }
      for (int64_t t0 = 0; t0 < Tp; t0 += tile) {
        const int64_t width = std::min(tile, Tp - t0);
        const float* Gt = G + t0 * m;
        const float* Xt = X + t0 * n;
        for (int64_t j = c0; j < c1;) {
          const int32_t row = rows[j - c0];
          int g = 0;
          while (g < kGroup && j + g < c1 && rows[j + g - c0] == row) {
            b[g] = Xt + static_cast<int64_t>(cols[j + g - c0]) * width;
            ++g;
          }
          dots.by_group[g](Gt + static_cast<int64_t>(row) * width, b, width, partial);
          for (int i = 0; i < g; ++i) values[j + i] += partial[i];  // tiles in order of t
          j += g;
        }
      }
    }
  });
  return out;
}

}  // namespace lift
