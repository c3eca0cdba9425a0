// sparse_adamw_step on the CPU: one call updates the selected entries of every weight of a bucket.
//
// The entries of all weights are numbered 0..K-1 in a row (a prefix sum of the k's), and
// at::parallel_for splits that range evenly over the threads, so a thread may run through the
// end of one weight and into the next: small and large weights balance without per-weight tasks.
// Each thread walks its range in tiles of kTile entries: it gathers grad[idx] and W[idx] into two
// stack arrays, runs AdamW on the contiguous tile (there the compiler vectorizes sqrt and the
// divisions), and scatters the rounded result back to W[idx]. Nothing is allocated per step.
//
// The arithmetic is the reference's (torch.optim.AdamW's single-tensor path), operation by
// operation and rounded as torch's CPU kernels round it: where torch dispatches to its AVX2/AVX512
// kernels, those are compiled with FMA contraction, so torch.lerp and addcmul round once there
// (fused multiply-add), and twice with torch's DEFAULT kernels; at::get_cpu_capability() says
// which, and the tile arithmetic is compiled in both forms. One difference remains: torch's CPU
// sqrt (MKL's vector math) is off by one ulp for about a fifth of fp32 inputs, while std::sqrt is
// correctly rounded, so results agree with the reference to about one ulp per step, not bit for bit.
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>
#include <vector>

#include "../kernels.h"
#include "adamw_tile.h"
#include "step_args.h"

namespace lift {
namespace {

using adamw::Hyper;
using adamw::TileFn;
using adamw::choose_tile_fn;
using adamw::make_hyper;

constexpr int64_t kTile = 256;                  // entries per gather / update / scatter round (2 KiB of stack)
constexpr int64_t kGrain = int64_t(1) << 15;    // fewer entries than this run on one thread
constexpr int64_t kAhead = 64;                  // prefetch distance of the gathers, in entries

// One weight of the bucket, as raw pointers; `first` is the number of its first entry in the row
// of all entries.
struct Weight {
  void* param;
  const void* grad;
  const int32_t* idx;
  float* exp_avg;
  float* exp_avg_sq;
  float* master;  // nullptr: the weight itself holds the fp32-or-rounded value
  int64_t numel, k, first;
  at::ScalarType param_type, grad_type;
  bool gathered;  // grad is the length-k gathered gradient, not the dense one
};

// Entries [lo, hi) of weight w. Returns false (and skips the tile) if an index is outside the
// weight, which sorted indices checked at their ends cannot be; the caller then raises.
template <typename P, typename G, bool kGathered, bool kMaster>
bool update_entries(const Weight& w, int64_t lo, int64_t hi, TileFn tile_fn, const Hyper& h) {
  P* param = static_cast<P*>(w.param);
  const G* grad = static_cast<const G*>(w.grad);
  float g[kTile], x[kTile];
  bool in_range = true;
  for (int64_t t = lo; t < hi; t += kTile) {
    const int64_t n = std::min(kTile, hi - t);
    const int32_t* idx = w.idx + t;
    bool ok = true;
    for (int64_t i = 0; i < n; ++i) ok &= static_cast<uint32_t>(idx[i]) < static_cast<uint64_t>(w.numel);
    if (!ok) {
      in_range = false;
      continue;
    }
    // Gather, asking for the lines kAhead entries on: the indices are sorted but their gaps are
    // irregular, which the hardware prefetchers do not follow well (SmolLM2-135M, rank 16, one
    // thread: 76 -> 57 ms per step).
    float* wt = kMaster ? w.master + t : x;
    for (int64_t i = 0; i < n; ++i) {
      const int32_t ahead = w.idx[std::min(t + i + kAhead, hi - 1)];
      if constexpr (!kGathered) __builtin_prefetch(grad + ahead, 0);
      __builtin_prefetch(param + ahead, 1);  // read, then written
      g[i] = static_cast<float>(grad[kGathered ? t + i : idx[i]]);
      if constexpr (!kMaster) x[i] = static_cast<float>(param[idx[i]]);
    }
    tile_fn(wt, w.exp_avg + t, w.exp_avg_sq + t, g, n, h);
    for (int64_t i = 0; i < n; ++i) param[idx[i]] = static_cast<P>(wt[i]);  // round to nearest even
  }
  return in_range;
}

template <typename P, typename G>
bool update_entries_as(const Weight& w, int64_t lo, int64_t hi, TileFn tile_fn, const Hyper& h) {
  if (w.gathered)
    return w.master ? update_entries<P, G, true, true>(w, lo, hi, tile_fn, h)
                    : update_entries<P, G, true, false>(w, lo, hi, tile_fn, h);
  return w.master ? update_entries<P, G, false, true>(w, lo, hi, tile_fn, h)
                  : update_entries<P, G, false, false>(w, lo, hi, tile_fn, h);
}

template <typename P>
bool update_entries_of(const Weight& w, int64_t lo, int64_t hi, TileFn tile_fn, const Hyper& h) {
  switch (w.grad_type) {
    case at::kFloat: return update_entries_as<P, float>(w, lo, hi, tile_fn, h);
    case at::kBFloat16: return update_entries_as<P, c10::BFloat16>(w, lo, hi, tile_fn, h);
    default: return update_entries_as<P, c10::Half>(w, lo, hi, tile_fn, h);
  }
}

bool update_range(const Weight& w, int64_t lo, int64_t hi, TileFn tile_fn, const Hyper& h) {
  switch (w.param_type) {
    case at::kFloat: return update_entries_of<float>(w, lo, hi, tile_fn, h);
    case at::kBFloat16: return update_entries_of<c10::BFloat16>(w, lo, hi, tile_fn, h);
    default: return update_entries_of<c10::Half>(w, lo, hi, tile_fn, h);
  }
}

constexpr const char* kOp = "sparse_adamw_step: ";

// A length-k fp32 state vector (moment or master) of weight i, checked.
float* state_ptr(const at::Tensor& s, const char* name, size_t i, int64_t k) {
  TORCH_CHECK(s.device().is_cpu(), "sparse_adamw_step: ", name, "[", i, "] must be a CPU tensor like params[",
              i, "], got ", s.device());
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.dim() == 1 && s.numel() == k && s.is_contiguous(),
              "sparse_adamw_step: ", name, "[", i, "] must be a contiguous fp32 vector of length k=", k,
              " (the length of idxs[", i, "]), got ", s.scalar_type(), " of shape ", s.sizes());
  return s.data_ptr<float>();
}

}  // namespace

void sparse_adamw_step_cpu(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                           const std::vector<at::Tensor>& idxs, const std::vector<at::Tensor>& exp_avgs,
                           const std::vector<at::Tensor>& exp_avg_sqs,
                           const std::vector<std::optional<at::Tensor>>& masters, int64_t step, double lr,
                           double beta1, double beta2, double eps, double weight_decay) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && idxs.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n,
              "sparse_adamw_step: grads, idxs, exp_avgs and exp_avg_sqs need one tensor per weight in params (",
              n, "), got ", grads.size(), ", ", idxs.size(), ", ", exp_avgs.size(), " and ", exp_avg_sqs.size());
  TORCH_CHECK(masters.size() == 0 || masters.size() == n,
              "sparse_adamw_step: masters must be empty (no master copies) or hold one entry (a tensor or None) "
              "per weight in params (", n, "), got ", masters.size());
  TORCH_CHECK(step >= 1, "sparse_adamw_step: step is the global step after increment and must be >= 1, got ", step);

  std::vector<Weight> weights;
  weights.reserve(n);
  std::vector<at::Tensor> contiguous_grads;  // only for grads given non-contiguous
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& idx = idxs[i];
    step_args::check_weight(kOp, i, p, idx);
    const int64_t k = idx.numel();
    float* m = state_ptr(exp_avgs[i], "exp_avgs", i, k);
    float* v = state_ptr(exp_avg_sqs[i], "exp_avg_sqs", i, k);
    float* master = nullptr;
    if (masters.size() != 0) {
      const std::optional<at::Tensor>& ms = masters[i];
      if (ms.has_value() && ms->defined()) master = state_ptr(*ms, "masters", i, k);
    }
    at::Tensor g = grads[i];
    const bool gathered = step_args::check_grad(kOp, i, p, g, k);
    if (k == 0) continue;
    const int32_t* ix = step_args::check_index_range(kOp, i, p, idx);
    if (!g.is_contiguous()) g = contiguous_grads.emplace_back(g.contiguous());
    weights.push_back(Weight{p.data_ptr(), g.const_data_ptr(), ix, m, v, master,
                             p.numel(), k, total, p.scalar_type(), g.scalar_type(), gathered});
    total += k;
  }
  if (total == 0) return;

  const Hyper h = make_hyper(step, lr, beta1, beta2, eps, weight_decay);
  const TileFn tile_fn = choose_tile_fn(h);
  std::atomic<bool> in_range{true};
  at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
    // the weight holding entry `begin`: the last one whose first entry is <= begin
    auto it = std::upper_bound(weights.begin(), weights.end(), begin,
                               [](int64_t e, const Weight& w) { return e < w.first; }) - 1;
    bool ok = true;
    for (int64_t e = begin; e < end; ++it) {
      const int64_t stop = std::min(end, it->first + it->k);
      ok &= update_range(*it, e - it->first, stop - it->first, tile_fn, h);
      e = stop;
    }
    if (!ok) in_range.store(false, std::memory_order_relaxed);
  });
  TORCH_CHECK(in_range.load(), "sparse_adamw_step: an index in idxs lies outside its weight; the entries of those "
              "tiles were left unchanged. idxs must hold sorted flat indices in [0, numel of the weight)");
}

}  // namespace lift
