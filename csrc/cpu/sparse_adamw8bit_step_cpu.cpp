// sparse_adamw8bit_step on the CPU: AdamW on the selected entries with 8-bit moments
// (lift_kernels/reference/moment_codes.py), one call for every weight of a bucket.
//
// The unit of work is a block of QBLOCK entries of one weight, since each block owns one scale per
// moment: a block's step reads both moments back, runs the fp32 AdamW tile of sparse_adamw_step
// (adamw_tile.h, so the weights round as that kernel's do), writes the weight (or master), and
// stores each moment's new scale (its largest |value|) and codes. Blocks are independent, so
// at::parallel_for over the blocks of all weights gives the same bits for any thread count.
//
// The codes follow the reference's rule exactly: r = value / scale as one IEEE fp32 division,
// clamped to [-1, 1], code = the number of fp32 midpoints (book[i] + book[i+1]) * 0.5 below r,
// found by an 8-step binary search.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "../kernels.h"
#include "adamw_tile.h"
#include "step_args.h"

namespace lift {
namespace {

constexpr int64_t kBlock = 256;   // QBLOCK of moment_codes.py: entries per scale
constexpr int64_t kGrainBlocks = 64;  // fewer blocks than this run on one thread
constexpr int kBook = 256;

using adamw::Hyper;
using adamw::TileFn;

// A code book and its 255 midpoints, both fp32.
struct Book {
  const float* values;
  float mid[kBook - 1];
};

void init_book(Book& b, const float* values) {
  b.values = values;
  for (int i = 0; i + 1 < kBook; ++i) b.mid[i] = (values[i] + values[i + 1]) * 0.5f;
}

// Reads n codes of one block back into x.
inline void dequantize(const uint8_t* codes, float scale, const Book& book, float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = book.values[codes[i]] * scale;
}

// Stores the n values of one block: its scale and codes.
inline void quantize(const float* x, int64_t n, const Book& book, uint8_t* codes, float* scale) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::abs(x[i]));
  *scale = amax;
  const float safe = amax > 0.0f ? amax : 1.0f;  // a zero block: r = value, all zero
  float r[kBlock];
  uint32_t code[kBlock];
  for (int64_t i = 0; i < n; ++i) {
    r[i] = std::min(1.0f, std::max(-1.0f, x[i] / safe));
    code[i] = 0;
  }
  // Lower bound without branches (a branchy search mispredicts about every other step on these
  // data): after the step of width s, code counts the midpoints below r among the first code + s.
  for (uint32_t s = (kBook >> 1); s >= 1; s >>= 1)
    for (int64_t i = 0; i < n; ++i) code[i] += book.mid[code[i] + s - 1] < r[i] ? s : 0;
  for (int64_t i = 0; i < n; ++i) codes[i] = static_cast<uint8_t>(code[i]);
}

struct Weight {
  void* param;
  const void* grad;
  const int32_t* idx;
  uint8_t* m_codes;
  float* m_scales;
  uint8_t* v_codes;
  float* v_scales;
  float* master;  // nullptr: the weight itself holds the fp32-or-rounded value
  int64_t numel, k, first_block;
  at::ScalarType param_type, grad_type;
  bool gathered;
};

// Block b of weight w. Returns false (the block left unchanged) if one of its indices lies outside
// the weight.
template <typename P, typename G>
bool update_block(const Weight& w, int64_t b, TileFn tile_fn, const Hyper& h, const Book& mb, const Book& vb) {
  const int64_t lo = b * kBlock;
  const int64_t n = std::min(kBlock, w.k - lo);
  const int32_t* idx = w.idx + lo;
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= static_cast<uint32_t>(idx[i]) < static_cast<uint64_t>(w.numel);
  if (!ok) return false;
  P* param = static_cast<P*>(w.param);
  const G* grad = static_cast<const G*>(w.grad);
  float g[kBlock], x[kBlock], m[kBlock], v[kBlock];
  float* wt = w.master ? w.master + lo : x;
  for (int64_t i = 0; i < n; ++i) {
    g[i] = static_cast<float>(grad[w.gathered ? lo + i : idx[i]]);
    if (!w.master) x[i] = static_cast<float>(param[idx[i]]);
  }
  dequantize(w.m_codes + lo, w.m_scales[b], mb, m, n);
  dequantize(w.v_codes + lo, w.v_scales[b], vb, v, n);
  tile_fn(wt, m, v, g, n, h);
  for (int64_t i = 0; i < n; ++i) param[idx[i]] = static_cast<P>(wt[i]);  // round to nearest even
  quantize(m, n, mb, w.m_codes + lo, w.m_scales + b);
  quantize(v, n, vb, w.v_codes + lo, w.v_scales + b);
  return true;
}

template <typename P>
bool update_block_of(const Weight& w, int64_t b, TileFn f, const Hyper& h, const Book& mb, const Book& vb) {
  switch (w.grad_type) {
    case at::kFloat: return update_block<P, float>(w, b, f, h, mb, vb);
    case at::kBFloat16: return update_block<P, c10::BFloat16>(w, b, f, h, mb, vb);
    default: return update_block<P, c10::Half>(w, b, f, h, mb, vb);
  }
}

bool update_any_block(const Weight& w, int64_t b, TileFn f, const Hyper& h, const Book& mb, const Book& vb) {
  switch (w.param_type) {
    case at::kFloat: return update_block_of<float>(w, b, f, h, mb, vb);
    case at::kBFloat16: return update_block_of<c10::BFloat16>(w, b, f, h, mb, vb);
    default: return update_block_of<c10::Half>(w, b, f, h, mb, vb);
  }
}


constexpr const char* kOp = "sparse_adamw8bit_step: ";

void check_vector(const at::Tensor& s, const char* name, size_t i, at::ScalarType dtype, int64_t len,
                  const char* what) {
  TORCH_CHECK(s.device().is_cpu(), kOp, name, "[", i, "] must be a CPU tensor like params[", i, "], got ",
              s.device());
  TORCH_CHECK(s.scalar_type() == dtype && s.dim() == 1 && s.numel() == len && s.is_contiguous(), kOp, name, "[",
              i, "] must be a contiguous ", dtype, " vector of length ", len, " (", what, "), got ",
              s.scalar_type(), " of shape ", s.sizes());
}

const float* book_ptr(const at::Tensor& book, const char* name) {
  TORCH_CHECK(book.device().is_cpu(), kOp, name, " must be a CPU tensor like params, got ", book.device());
  TORCH_CHECK(book.scalar_type() == at::kFloat && book.dim() == 1 && book.numel() == kBook && book.is_contiguous(),
              kOp, name, " must be a contiguous fp32 tensor of shape (256,), got ", book.scalar_type(),
              " of shape ", book.sizes());
  const float* b = book.const_data_ptr<float>();
  for (int i = 0; i + 1 < kBook; ++i)
    TORCH_CHECK(b[i] < b[i + 1], kOp, name, " must be sorted in increasing order, but entry ", i, " (", b[i],
                ") is not below entry ", i + 1, " (", b[i + 1], ")");
  return b;
}

}  // namespace

void sparse_adamw8bit_step_cpu(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                               const std::vector<at::Tensor>& idxs, const std::vector<at::Tensor>& exp_avg_codes,
                               const std::vector<at::Tensor>& exp_avg_scales,
                               const std::vector<at::Tensor>& exp_avg_sq_codes,
                               const std::vector<at::Tensor>& exp_avg_sq_scales,
                               const std::vector<std::optional<at::Tensor>>& masters, const at::Tensor& exp_avg_book,
                               const at::Tensor& exp_avg_sq_book, int64_t step, double lr, double beta1,
                               double beta2, double eps, double weight_decay) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && idxs.size() == n && exp_avg_codes.size() == n && exp_avg_scales.size() == n &&
                  exp_avg_sq_codes.size() == n && exp_avg_sq_scales.size() == n,
              kOp, "grads, idxs, exp_avg_codes, exp_avg_scales, exp_avg_sq_codes and exp_avg_sq_scales need one "
              "tensor per weight in params (", n, "), got ", grads.size(), ", ", idxs.size(), ", ",
              exp_avg_codes.size(), ", ", exp_avg_scales.size(), ", ", exp_avg_sq_codes.size(), " and ",
              exp_avg_sq_scales.size());
  TORCH_CHECK(masters.size() == 0 || masters.size() == n, kOp,
              "masters must be empty (no master copies) or hold one entry (a tensor or None) per weight in params (",
              n, "), got ", masters.size());
  TORCH_CHECK(step >= 1, kOp, "step is the global step after increment and must be >= 1, got ", step);
  Book mb, vb;
  init_book(mb, book_ptr(exp_avg_book, "exp_avg_book"));
  init_book(vb, book_ptr(exp_avg_sq_book, "exp_avg_sq_book"));

  std::vector<Weight> weights;
  weights.reserve(n);
  std::vector<at::Tensor> contiguous_grads;  // only for grads given non-contiguous
  int64_t total_blocks = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& idx = idxs[i];
    step_args::check_weight(kOp, i, p, idx);
    const int64_t k = idx.numel();
    const int64_t blocks = (k + kBlock - 1) / kBlock;
    check_vector(exp_avg_codes[i], "exp_avg_codes", i, at::kByte, k, "k, the length of idxs[i]");
    check_vector(exp_avg_sq_codes[i], "exp_avg_sq_codes", i, at::kByte, k, "k, the length of idxs[i]");
    check_vector(exp_avg_scales[i], "exp_avg_scales", i, at::kFloat, blocks, "ceil(k / 256), one per block");
    check_vector(exp_avg_sq_scales[i], "exp_avg_sq_scales", i, at::kFloat, blocks, "ceil(k / 256), one per block");
    float* master = nullptr;
    if (masters.size() != 0) {
      const std::optional<at::Tensor>& ms = masters[i];
      if (ms.has_value() && ms->defined()) {
        check_vector(*ms, "masters", i, at::kFloat, k, "k, the length of idxs[i]");
        master = ms->data_ptr<float>();
      }
    }
    at::Tensor g = grads[i];
    const bool gathered = step_args::check_grad(kOp, i, p, g, k);
    if (k == 0) continue;
    const int32_t* ix = step_args::check_index_range(kOp, i, p, idx);
    if (!g.is_contiguous()) g = contiguous_grads.emplace_back(g.contiguous());
    weights.push_back(Weight{p.data_ptr(), g.const_data_ptr(), ix, exp_avg_codes[i].data_ptr<uint8_t>(),
                             exp_avg_scales[i].data_ptr<float>(), exp_avg_sq_codes[i].data_ptr<uint8_t>(),
                             exp_avg_sq_scales[i].data_ptr<float>(), master, p.numel(), k, total_blocks,
                             p.scalar_type(), g.scalar_type(), gathered});
    total_blocks += blocks;
  }
  if (total_blocks == 0) return;

  const Hyper h = adamw::make_hyper(step, lr, beta1, beta2, eps, weight_decay);
  const TileFn tile_fn = adamw::choose_tile_fn(h);
  std::atomic<bool> in_range{true};
  at::parallel_for(0, total_blocks, kGrainBlocks, [&](int64_t begin, int64_t end) {
    // the weight holding block `begin`: the last one whose first block is <= begin
    auto it = std::upper_bound(weights.begin(), weights.end(), begin,
                               [](int64_t b, const Weight& w) { return b < w.first_block; }) - 1;
    bool ok = true;
    for (int64_t b = begin; b < end; ++b) {
      while (b >= it->first_block + (it->k + kBlock - 1) / kBlock) ++it;
      ok &= update_any_block(*it, b - it->first_block, tile_fn, h, mb, vb);
    }
    if (!ok) in_range.store(false, std::memory_order_relaxed);
  });
  TORCH_CHECK(in_range.load(), kOp, "an index in idxs lies outside its weight; the entries of those blocks were left "
              "unchanged. idxs must hold sorted flat indices in [0, numel of the weight)");
}

}  // namespace lift
