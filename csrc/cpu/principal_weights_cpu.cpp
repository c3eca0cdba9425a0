// principal_weights on the CPU: the shared driver (../principal_weights.h) with a fused top-k of
// |L R| that recomputes L R in every radix pass, a tile of rows per GEMM (r multiply-adds per
// entry), instead of storing the m x n product. Tiles are split over threads with at::parallel_for.
#include <ATen/Parallel.h>

#include <algorithm>
#include <mutex>
#include <vector>

#include "../kernels.h"
#include "../principal_weights.h"
#include "../radix_select.h"
#include "../topk_abs_product.h"

namespace lift {
namespace {

constexpr int64_t kTileEntries = int64_t(1) << 15;  // entries of L R per GEMM tile (128 KiB in fp32)

template <typename scalar_t>
struct Factors {
  at::Tensor L;  // (m, r)
  at::Tensor R;  // (r, n)
  int64_t m, n, tile_rows;

  Factors(at::Tensor L_, at::Tensor R_)
      : L(std::move(L_)), R(std::move(R_)), m(L.size(0)), n(R.size(1)),
        tile_rows(std::max<int64_t>(1, std::min(m, kTileEntries / std::max<int64_t>(n, 1)))) {}
};

// fn(begin, end, row_of) for each tile of rows [begin, end), tiles in parallel: one GEMM computes
// the tile into a buffer of the calling thread, row_of(i) points at row i in it. The tiles are
// fixed by the shapes alone, so every pass computes every entry with the same GEMM call and sees
// the same value.
template <typename scalar_t, typename Fn>
void over_row_tiles(const Factors<scalar_t>& F, Fn&& fn) {
  const int64_t tiles = (F.m + F.tile_rows - 1) / F.tile_rows;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor buf = at::empty({F.tile_rows, F.n}, F.L.options());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i0 = t * F.tile_rows, rows = std::min(F.tile_rows, F.m - i0);
      at::Tensor out = buf.narrow(0, 0, rows);
      at::mm_out(out, F.L.narrow(0, i0, rows), F.R);
      const scalar_t* values = out.data_ptr<scalar_t>();
      fn(i0, i0 + rows, [&](int64_t i) { return values + (i - i0) * F.n; });
    }
  });
}

template <typename scalar_t>
void histogram_digit(const Factors<scalar_t>& F, int p, const radix::State& st, bool largest,
                     std::vector<int64_t>& hist) {
  std::mutex mu;
  over_row_tiles(F, [&](int64_t begin, int64_t end, auto&& row_of) {
    std::vector<int64_t> local(radix::kBins, 0);
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* row = row_of(i);
      for (int64_t j = 0; j < F.n; ++j) {
        const auto key = radix::abs_key(row[j], largest);
        if (radix::matches<scalar_t>(key, st)) ++local[radix::digit_of<scalar_t>(key, p)];
      }
    }
    std::lock_guard<std::mutex> lock(mu);
    for (int d = 0; d < radix::kBins; ++d) hist[d] += local[d];
  });
}

// The k entries of one matrix: radix passes fix the threshold key, a counting pass gives each row's
// output offset, and the last pass writes the indices in flat order.
template <typename scalar_t>
void select_matrix(const Factors<scalar_t>& F, int64_t k, bool largest, int32_t* out) {
  radix::State st{0, 0, k};
  std::vector<int64_t> hist(radix::kBins);
  for (int p = 0; p < radix::num_digits<scalar_t>(); ++p) {
    std::fill(hist.begin(), hist.end(), 0);
    histogram_digit(F, p, st, largest, hist);
    radix::choose_digit<scalar_t>(hist.data(), p, st);
  }
  const auto threshold = static_cast<radix::Key<scalar_t>>(st.prefix);

  const at::Tensor above = at::empty({1, F.m}, at::kLong);
  const at::Tensor ties = at::empty({1, F.m}, at::kLong);
  int64_t* above_p = above.data_ptr<int64_t>();
  int64_t* ties_p = ties.data_ptr<int64_t>();
  over_row_tiles(F, [&](int64_t begin, int64_t end, auto&& row_of) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* row = row_of(i);
      int64_t a = 0, t = 0;
      for (int64_t j = 0; j < F.n; ++j) {
        const auto key = radix::abs_key(row[j], largest);
        a += key > threshold;
        t += key == threshold;
      }
      above_p[i] = a;
      ties_p[i] = t;
    }
  });

  at::Tensor offsets, ties_before;
  std::tie(offsets, ties_before) = row_output_offsets(above, ties, at::full({1}, st.k_rem, at::kLong));
  const int64_t* offset_p = offsets.data_ptr<int64_t>();
  const int64_t* tie_p = ties_before.data_ptr<int64_t>();
  over_row_tiles(F, [&](int64_t begin, int64_t end, auto&& row_of) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* row = row_of(i);
      const int64_t begin_pos = offset_p[i], end_pos = i + 1 < F.m ? offset_p[i + 1] : k;
      int64_t pos = begin_pos, tie = tie_p[i];
      for (int64_t j = 0; j < F.n; ++j) {
        const auto key = radix::abs_key(row[j], largest);
        if (key > threshold || (key == threshold && tie++ < st.k_rem)) {
          if (pos < end_pos) out[pos] = static_cast<int32_t>(i * F.n + j);
          ++pos;
        }
      }
      // The counting pass saw the same values, so each row fills exactly its slot.
      TORCH_CHECK(pos == end_pos, "topk_abs_product: passes over L R disagreed in row ", i);
    }
  });
}

}  // namespace

at::Tensor topk_abs_product_cpu(const at::Tensor& L, const at::Tensor& R, int64_t k, bool largest) {
  check_topk_abs_product_args(L, R, k);
  const int64_t b = L.size(0), m = L.size(1), r = L.size(2), n = R.size(2);
  auto out = at::empty({b, k}, L.options().dtype(at::kInt));
  if (k == 0) return out;
  auto Lc = L.contiguous(), Rc = R.contiguous();
  AT_DISPATCH_FLOATING_TYPES(Lc.scalar_type(), "topk_abs_product_cpu", [&] {
    for (int64_t i = 0; i < b; ++i) {
      select_matrix(Factors<scalar_t>(Lc[i], Rc[i]), k, largest, out.data_ptr<int32_t>() + i * k);
    }
  });
  return out;
}

at::Tensor principal_weights_cpu(const at::Tensor& W, int64_t k, int64_t lra_rank, bool largest, int64_t seed) {
  return principal_weights(W, k, lra_rank, largest, seed, &topk_abs_product_cpu);
}

}  // namespace lift
