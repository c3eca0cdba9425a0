// Probes of how the CPU kernels run in parallel, for lk.info() and the tests: whether _C was compiled
// with OpenMP, and how many threads at::parallel_for really starts from this extension. ATen's
// parallel_for is a header template: it runs threads only where the file that calls it is compiled
// with OpenMP, whatever torch itself was built with, so only a call made from _C can tell.
#include <ATen/Parallel.h>

#include <atomic>

#include "../kernels.h"

namespace lift {

int64_t openmp_version() {
#ifdef _OPENMP
  return _OPENMP;  // the yyyymm date of the OpenMP specification the compiler implements
#else
  return 0;
#endif
}

int64_t parallel_for_threads() {
  // One chunk per thread (grain 1, as many items as threads): every thread at::parallel_for starts
  // runs one chunk and marks its thread number.
  const int64_t n = at::get_num_threads();
  std::atomic<int64_t> used{0};
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) { used.fetch_add(1, std::memory_order_relaxed); });
  return used.load();
}

}  // namespace lift
