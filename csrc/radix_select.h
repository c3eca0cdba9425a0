// Exact top-k by radix select on the bits of |x|, shared by the CPU and CUDA selection kernels so
// both walk the same digits and break ties the same way. Plain C++ (also compiled by nvcc).
//
// For IEEE floats with the sign bit cleared, the bit pattern as an unsigned integer orders like
// the value, so the k-th largest |x| is found digit by digit from the top: each pass histograms
// the next kDigitBits of the keys that match the prefix found so far. Selecting the smallest
// entries complements the keys, so every selection is "the k largest keys".
#pragma once

#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define LIFT_HD __host__ __device__ __forceinline__
#else
#define LIFT_HD inline
#endif

namespace lift {
namespace radix {

constexpr int kDigitBits = 11;
constexpr int kBins = 1 << kDigitBits;

template <typename scalar_t>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = uint32_t;
};
template <>
struct KeyOf<double> {
  using type = uint64_t;
};

template <typename scalar_t>
using Key = typename KeyOf<scalar_t>::type;

template <typename scalar_t>
LIFT_HD constexpr int key_bits() {
  return 8 * static_cast<int>(sizeof(Key<scalar_t>));
}

template <typename scalar_t>
LIFT_HD constexpr int num_digits() {
  return (key_bits<scalar_t>() + kDigitBits - 1) / kDigitBits;
}

// Digit p (0 = most significant) covers bits [shift, shift + width) of the key.
template <typename scalar_t>
LIFT_HD int digit_shift(int p) {
  const int s = key_bits<scalar_t>() - kDigitBits * (p + 1);
  return s < 0 ? 0 : s;
}

template <typename scalar_t>
LIFT_HD int digit_width(int p) {
  return key_bits<scalar_t>() - kDigitBits * p - digit_shift<scalar_t>(p);
}

// Key of |x| (-0 and 0 are one key; NaN sorts above inf), complemented for smallest-first.
template <typename scalar_t>
LIFT_HD Key<scalar_t> abs_key(scalar_t x, bool largest) {
  Key<scalar_t> bits;
  memcpy(&bits, &x, sizeof(bits));
  bits &= ~(Key<scalar_t>(1) << (key_bits<scalar_t>() - 1));
  return largest ? bits : static_cast<Key<scalar_t>>(~bits);
}

// Selection state of one matrix: the key prefix fixed so far (under `mask`) and how many of the
// k entries are still to be chosen among the keys that carry it.
struct State {
  uint64_t prefix;
  uint64_t mask;
  int64_t k_rem;
};

template <typename scalar_t>
LIFT_HD bool matches(Key<scalar_t> key, const State& st) {
  return (static_cast<uint64_t>(key) & st.mask) == st.prefix;
}

template <typename scalar_t>
LIFT_HD int digit_of(Key<scalar_t> key, int p) {
  return static_cast<int>((key >> digit_shift<scalar_t>(p)) & ((1u << digit_width<scalar_t>(p)) - 1));
}

// After the histogram of digit p (over the keys matching st), fix that digit: the highest bin at
// which the count of keys from the top reaches k_rem; k_rem becomes the number still to take there.
template <typename scalar_t, typename count_t>
LIFT_HD void choose_digit(const count_t* hist, int p, State& st) {
  const int width = digit_width<scalar_t>(p);
  int64_t above = 0;
  int d = (1 << width) - 1;
  for (; d > 0; --d) {
    if (above + static_cast<int64_t>(hist[d]) >= st.k_rem) break;
    above += static_cast<int64_t>(hist[d]);
  }
  const int shift = digit_shift<scalar_t>(p);
  st.prefix |= static_cast<uint64_t>(d) << shift;
  st.mask |= static_cast<uint64_t>((1u << width) - 1) << shift;
  st.k_rem -= above;
}

}  // namespace radix
}  // namespace lift
