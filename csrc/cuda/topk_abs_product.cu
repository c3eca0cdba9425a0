// CUDA kernels of the fused top-k of |L R| (see topk_abs_product_cuda.h for the sequence). Every
// pass recomputes its tiles of L R from L and R in shared memory with the same code and the same
// summation order (explicit fma over r ascending), so all passes see bit-identical values and the
// radix counts are consistent; the m x n product never exists in memory.
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cstdint>

#include "../radix_select.h"
#include "topk_abs_product_cuda.h"

namespace lift {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kTileM = 64;  // rows of a tile (and of a thread block's band)
constexpr int kTileN = 64;  // columns of a tile
constexpr int kTileK = 16;  // slice of r staged in shared memory at once
constexpr int kWarps = kThreads / 32;
// Each thread owns a 4 x 4 strided micro-tile: rows ty + 16 a, columns tx + 16 b.
constexpr int kMicro = 4;
constexpr int kStride = 16;
static_assert(kTileM == kMicro * kStride && kTileN == kMicro * kStride, "a tile is the threads' micro-tiles");

// Thread blocks per SM that column_splits plans for, and that every tile kernel's
// __launch_bounds__ holds ptxas to (tests/test_sm90_sass.py checks the cubin). float: 63-64
// registers, no spills (4 x 256 threads x 64 = the SM's 65536; unbounded, emit takes 75 and fits
// 3). double, with 16 double accumulators: 120-122 registers for 2; bounded for 3 (80 registers)
// they spill 2-6.
template <typename scalar_t>
constexpr int kBlocksPerSm = sizeof(scalar_t) == 4 ? 4 : 2;

// Shared staging of one r-slice. Row t of L holds column t of L's band, row t of R row t of R's
// tile; within a row, entry i (a row of the band, or a column of the tile) sits at slot(i), so that
// a thread's micro-tile entries i = c + 16 a (a = 0..3) are adjacent: one 16-byte vector load each
// for L and R per t, instead of eight scalar loads. Rows are padded by 16 bytes (kPad entries): the
// staging writes of a warp (8 consecutive t of 4 rows of L) then fall in distinct banks, for
// float over the warp and for double over each half-warp (64-bit accesses go by half-warps).
template <typename scalar_t>
constexpr int kPad = 16 / static_cast<int>(sizeof(scalar_t));

__device__ __forceinline__ int slot(int i) { return kMicro * (i % kStride) + i / kStride; }

template <typename scalar_t>
struct TileBuffers {
  alignas(16) scalar_t L[kTileK][kTileM + kPad<scalar_t>];
  alignas(16) scalar_t R[kTileK][kTileN + kPad<scalar_t>];
};

// v = the kMicro adjacent entries at p (16-byte aligned) in 16-byte shared loads.
__device__ __forceinline__ void load_micro(const float* p, float (&v)[kMicro]) {
  const float4 q = *reinterpret_cast<const float4*>(p);
  v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
}
__device__ __forceinline__ void load_micro(const double* p, double (&v)[kMicro]) {
  const double2 q0 = reinterpret_cast<const double2*>(p)[0], q1 = reinterpret_cast<const double2*>(p)[1];
  v[0] = q0.x, v[1] = q0.y, v[2] = q1.x, v[3] = q1.y;
}

// acc = the tile of L R at (row0, col0) for this thread's micro-tile (zero outside the matrix).
template <typename scalar_t>
__device__ void product_tile(const Factors<scalar_t>& f, const scalar_t* L, const scalar_t* R, int64_t row0,
                             int64_t col0, TileBuffers<scalar_t>& sm, scalar_t (&acc)[kMicro][kMicro]) {
  const int tx = threadIdx.x % kStride, ty = threadIdx.x / kStride;
#pragma unroll
  for (int a = 0; a < kMicro; ++a)
#pragma unroll
    for (int b = 0; b < kMicro; ++b) acc[a][b] = scalar_t(0);
  for (int64_t k0 = 0; k0 < f.r; k0 += kTileK) {
    __syncthreads();  // the previous slice is consumed
    // A warp stages 8 consecutive t (32 bytes of a row of L in global memory) of the 4 rows
    // c + 16 d, d = 0..3, whose slots are adjacent: 32 distinct banks with the padding.
    constexpr int kRun = 8;
    static_assert(kTileK % kRun == 0, "L is staged in runs of kRun entries of r");
    for (int e = threadIdx.x; e < kTileM * kTileK; e += kThreads) {
      const int t = e % kRun + kRun * (e / (kRun * kTileM)), d = (e / kRun) % kMicro;
      const int i = (e / (kRun * kMicro)) % kStride + kStride * d;
      const bool in = row0 + i < f.m && k0 + t < f.r;
      sm.L[t][slot(i)] = in ? L[(row0 + i) * f.r + k0 + t] : scalar_t(0);
    }
    // A warp writes 32 consecutive slots of one row t of R: 4 runs of 8 columns in global memory.
    for (int e = threadIdx.x; e < kTileK * kTileN; e += kThreads) {
      const int t = e / kTileN, j = (e % kTileN) / kMicro + kStride * (e % kMicro);
      const bool in = k0 + t < f.r && col0 + j < f.n;
      sm.R[t][slot(j)] = in ? R[(k0 + t) * f.n + col0 + j] : scalar_t(0);
    }
    __syncthreads();
    const int kmax = static_cast<int>(f.r - k0 < kTileK ? f.r - k0 : kTileK);
    for (int t = 0; t < kmax; ++t) {
      scalar_t lv[kMicro], rv[kMicro];  // rows ty + 16 a of L, columns tx + 16 b of R
      load_micro(&sm.L[t][kMicro * ty], lv);
      load_micro(&sm.R[t][kMicro * tx], rv);
#pragma unroll
      for (int a = 0; a < kMicro; ++a)
#pragma unroll
        for (int b = 0; b < kMicro; ++b) acc[a][b] = fma(lv[a], rv[b], acc[a][b]);
    }
  }
}

// The column range [begin, end) of segment `seg` (a multiple of kTileN wide).
struct Segment {
  int64_t begin, end;
};

__device__ Segment segment_columns(int64_t n, int splits, int seg) {
  const int64_t tiles = (n + kTileN - 1) / kTileN;
  const int64_t per = (tiles + splits - 1) / splits * kTileN;
  const int64_t begin = seg * per;
  return {begin < n ? begin : n, begin + per < n ? begin + per : n};
}

// Calls tile_fn(row0, col0, col_end, acc) for each tile of this block's band and segment, in
// column order, right after the tile is computed (by all threads of the block).
template <typename scalar_t, typename TileFn>
__device__ void for_each_tile(const Factors<scalar_t>& f, TileBuffers<scalar_t>& sm, TileFn&& tile_fn) {
  const int64_t mat = blockIdx.z, row0 = int64_t(blockIdx.x) * kTileM;
  const scalar_t* L = f.L + mat * f.m * f.r;
  const scalar_t* R = f.R + mat * f.r * f.n;
  const Segment cols = segment_columns(f.n, f.splits, blockIdx.y);
  for (int64_t col0 = cols.begin; col0 < cols.end; col0 += kTileN) {
    scalar_t acc[kMicro][kMicro];
    product_tile(f, L, R, row0, col0, sm, acc);
    tile_fn(row0, col0, cols.end, acc);
  }
}

// Calls visit(local_row, key) for every entry of this block's band and segment.
template <typename scalar_t, typename Visit>
__device__ void for_each_key(const Factors<scalar_t>& f, TileBuffers<scalar_t>& sm, Visit&& visit) {
  const int tx = threadIdx.x % kStride, ty = threadIdx.x / kStride;
  for_each_tile(f, sm, [&](int64_t row0, int64_t col0, int64_t col_end, scalar_t (&acc)[kMicro][kMicro]) {
#pragma unroll
    for (int a = 0; a < kMicro; ++a)
#pragma unroll
      for (int b = 0; b < kMicro; ++b) {
        const int i = ty + kStride * a;
        if (row0 + i < f.m && col0 + tx + kStride * b < col_end)
          visit(i, radix::abs_key(acc[a][b], f.largest));
      }
  });
}

__device__ radix::State load_state(const int64_t* state, int64_t mat) {
  const int64_t* s = state + 3 * mat;
  return {static_cast<uint64_t>(s[0]), static_cast<uint64_t>(s[1]), s[2]};
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm<scalar_t>)
    histogram_kernel(Factors<scalar_t> f, int digit, const int64_t* state, int32_t* hist) {
  __shared__ TileBuffers<scalar_t> sm;
  __shared__ int32_t counts[radix::kBins];
  for (int d = threadIdx.x; d < radix::kBins; d += kThreads) counts[d] = 0;
  __syncthreads();
  const radix::State st = load_state(state, blockIdx.z);
  for_each_key(f, sm, [&](int, radix::Key<scalar_t> key) {
    if (radix::matches<scalar_t>(key, st)) atomicAdd(&counts[radix::digit_of<scalar_t>(key, digit)], 1);
  });
  __syncthreads();
  int32_t* h = hist + int64_t(blockIdx.z) * radix::kBins;
  for (int d = threadIdx.x; d < radix::kBins; d += kThreads)
    if (counts[d]) atomicAdd(&h[d], counts[d]);
}

// One block per matrix: find the bin where the count from the top reaches k_rem (a block-wide scan
// over chunks of bins, the top chunk first), fix that digit in the state, and zero the histogram.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) choose_digit_kernel(int digit, int32_t* hist, int64_t* state) {
  constexpr int kPer = radix::kBins / kThreads;
  using Scan = cub::BlockScan<int64_t, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  int32_t* h = hist + int64_t(blockIdx.x) * radix::kBins;
  int64_t* s = state + 3 * int64_t(blockIdx.x);
  const int chunk = kThreads - 1 - threadIdx.x;  // thread 0 holds the highest bins
  int32_t bins[kPer];
  int64_t sum = 0;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    bins[j] = h[chunk * kPer + j];
    sum += bins[j];
  }
  int64_t above;
  Scan(scan_storage).ExclusiveSum(sum, above);
  const int64_t k_rem = s[2];
  __syncthreads();  // every thread has read k_rem and its bins
  if (above < k_rem && above + sum >= k_rem) {
    int j = kPer - 1;
    for (; j > 0 && above + bins[j] < k_rem; --j) above += bins[j];
    const int shift = radix::digit_shift<scalar_t>(digit), width = radix::digit_width<scalar_t>(digit);
    s[0] = static_cast<int64_t>(static_cast<uint64_t>(s[0]) | (static_cast<uint64_t>(chunk * kPer + j) << shift));
    s[1] = static_cast<int64_t>(static_cast<uint64_t>(s[1]) | (static_cast<uint64_t>((1u << width) - 1) << shift));
    s[2] = k_rem - above;
  }
#pragma unroll
  for (int j = 0; j < kPer; ++j) h[chunk * kPer + j] = 0;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm<scalar_t>)
    count_kernel(Factors<scalar_t> f, const int64_t* state, int64_t* above, int64_t* ties) {
  __shared__ TileBuffers<scalar_t> sm;
  __shared__ int32_t n_above[kTileM], n_ties[kTileM];
  if (threadIdx.x < kTileM) n_above[threadIdx.x] = n_ties[threadIdx.x] = 0;
  __syncthreads();
  const auto threshold = static_cast<radix::Key<scalar_t>>(load_state(state, blockIdx.z).prefix);
  for_each_key(f, sm, [&](int i, radix::Key<scalar_t> key) {
    if (key > threshold) atomicAdd(&n_above[i], 1);
    else if (key == threshold) atomicAdd(&n_ties[i], 1);
  });
  __syncthreads();
  const int64_t row = int64_t(blockIdx.x) * kTileM + threadIdx.x;
  if (threadIdx.x < kTileM && row < f.m) {
    const int64_t seg = int64_t(blockIdx.z) * f.m * f.splits + row * f.splits + blockIdx.y;
    above[seg] = n_above[threadIdx.x];
    ties[seg] = n_ties[threadIdx.x];
  }
}

__device__ int warp_exclusive_sum(int v, int lane, int& total) {
  int incl = v;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int up = __shfl_up_sync(0xffffffffu, incl, d);
    if (lane >= d) incl += up;
  }
  total = __shfl_sync(0xffffffffu, incl, 31);
  return incl - v;
}

// Each tile's verdicts (0 not selected, 1 above the threshold, 2 a tie) go to shared memory; one
// warp per row then writes that row's selected indices in column order: above-threshold entries
// always, ties while the matrix still needs ties (global tie ordinal < k_rem).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm<scalar_t>)
    emit_kernel(Factors<scalar_t> f, const int64_t* state, const int64_t* offsets, const int64_t* ties_before,
                int32_t* out, int64_t k) {
  constexpr int kPerLane = kTileN / 32;
  __shared__ TileBuffers<scalar_t> sm;
  __shared__ uint8_t verdict[kTileM][kTileN];
  __shared__ int64_t next_pos[kTileM], next_tie[kTileM];
  const int64_t mat = blockIdx.z;
  const radix::State st = load_state(state, mat);
  const auto threshold = static_cast<radix::Key<scalar_t>>(st.prefix);
  {
    const int64_t row = int64_t(blockIdx.x) * kTileM + threadIdx.x;
    if (threadIdx.x < kTileM && row < f.m) {
      const int64_t seg = mat * f.m * f.splits + row * f.splits + blockIdx.y;
      next_pos[threadIdx.x] = offsets[seg];
      next_tie[threadIdx.x] = ties_before[seg];
    }
  }
  int32_t* o = out + mat * k;
  const int tx = threadIdx.x % kStride, ty = threadIdx.x / kStride;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for_each_tile(f, sm, [&](int64_t row0, int64_t col0, int64_t col_end, scalar_t (&acc)[kMicro][kMicro]) {
    __syncthreads();  // the previous tile's verdicts are all out
#pragma unroll
    for (int a = 0; a < kMicro; ++a)
#pragma unroll
      for (int b = 0; b < kMicro; ++b) {
        const int i = ty + kStride * a, j = tx + kStride * b;
        const auto key = radix::abs_key(acc[a][b], f.largest);
        const bool in = row0 + i < f.m && col0 + j < col_end;
        verdict[i][j] = !in ? 0 : (key > threshold ? 1 : (key == threshold ? 2 : 0));
      }
    __syncthreads();
    for (int i = warp; i < kTileM && row0 + i < f.m; i += kWarps) {
      uint8_t v[kPerLane];
      int n_ties = 0;
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) {
        v[e] = verdict[i][lane * kPerLane + e];
        n_ties += v[e] == 2;
      }
      int ties_in_tile, sel_in_tile;
      int64_t tie = next_tie[i] + warp_exclusive_sum(n_ties, lane, ties_in_tile);
      bool take[kPerLane];
      int n_sel = 0;
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) {
        take[e] = v[e] == 1 || (v[e] == 2 && tie < st.k_rem);
        tie += v[e] == 2;
        n_sel += take[e];
      }
      const int64_t row_pos = next_pos[i], row_tie = next_tie[i];
      int64_t pos = row_pos + warp_exclusive_sum(n_sel, lane, sel_in_tile);
      const int64_t flat = (row0 + i) * f.n + col0 + lane * kPerLane;
#pragma unroll
      for (int e = 0; e < kPerLane; ++e)
        if (take[e] && pos < k) o[pos++] = static_cast<int32_t>(flat + e);
      __syncwarp();
      if (lane == 0) {
        next_pos[i] = row_pos + sel_in_tile;
        next_tie[i] = row_tie + ties_in_tile;
      }
      __syncwarp();
    }
  });
}

template <typename scalar_t>
dim3 grid_of(const Factors<scalar_t>& f) {
  return dim3(static_cast<unsigned>((f.m + kTileM - 1) / kTileM), static_cast<unsigned>(f.splits),
              static_cast<unsigned>(f.batch));
}

}  // namespace

template <typename scalar_t>
int column_splits(int64_t batch, int64_t m, int64_t n, int device) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) sms = 132;
  const int64_t bands = batch * ((m + kTileM - 1) / kTileM);
  const int64_t tiles = (n + kTileN - 1) / kTileN;
  const int64_t want = (int64_t(kBlocksPerSm<scalar_t>) * sms + bands - 1) / bands;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({want, tiles, 65535})));
}

template <typename scalar_t>
void launch_histogram(const Factors<scalar_t>& f, int digit, const int64_t* state, int32_t* hist,
                      cudaStream_t stream) {
  histogram_kernel<scalar_t><<<grid_of(f), kThreads, 0, stream>>>(f, digit, state, hist);
}

template <typename scalar_t>
void launch_choose_digit(int64_t batch, int digit, int32_t* hist, int64_t* state, cudaStream_t stream) {
  choose_digit_kernel<scalar_t><<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(digit, hist, state);
}

template <typename scalar_t>
void launch_count(const Factors<scalar_t>& f, const int64_t* state, int64_t* above, int64_t* ties,
                  cudaStream_t stream) {
  count_kernel<scalar_t><<<grid_of(f), kThreads, 0, stream>>>(f, state, above, ties);
}

template <typename scalar_t>
void launch_emit(const Factors<scalar_t>& f, const int64_t* state, const int64_t* offsets,
                 const int64_t* ties_before, int32_t* out, int64_t k, cudaStream_t stream) {
  emit_kernel<scalar_t><<<grid_of(f), kThreads, 0, stream>>>(f, state, offsets, ties_before, out, k);
}

#define LIFT_INSTANTIATE(T)                                                                                   \
  template int column_splits<T>(int64_t, int64_t, int64_t, int);                                              \
  template void launch_histogram<T>(const Factors<T>&, int, const int64_t*, int32_t*, cudaStream_t);         \
  template void launch_choose_digit<T>(int64_t, int, int32_t*, int64_t*, cudaStream_t);                      \
  template void launch_count<T>(const Factors<T>&, const int64_t*, int64_t*, int64_t*, cudaStream_t);        \
  template void launch_emit<T>(const Factors<T>&, const int64_t*, const int64_t*, const int64_t*, int32_t*, \
                               int64_t, cudaStream_t);
LIFT_INSTANTIATE(float)
LIFT_INSTANTIATE(double)
#undef LIFT_INSTANTIATE

}  // namespace cuda
}  // namespace lift
