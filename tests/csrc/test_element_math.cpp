// Host test of csrc/element_math.cuh and csrc/multi_tensor.cuh: the arithmetic and the launch
// planning the CUDA kernels run, compiled by g++.
// Prints "N passed, M failed" and exits non-zero on any failure.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <map>
#include <random>
#include <utility>
#include <vector>

#include "../../csrc/element_math.cuh"
#include "../../csrc/multi_tensor.cuh"

using namespace autoaccum;

static int passed = 0, failed = 0;

static void check(bool ok, const char* what) {
  if (ok) {
    ++passed;
  } else {
    ++failed;
    std::printf("FAILED: %s\n", what);
  }
}

static double norm_of(const std::vector<float>& xs, int* bad, int split = 1) {
  // Split into `split` parts, merge them: the result must not depend on the split.
  std::vector<NormState> parts(split, norm_empty());
  for (size_t i = 0; i < xs.size(); ++i) norm_update(parts[i % split], xs[i]);
  NormState total = norm_empty();
  for (const NormState& p : parts) total = norm_merge(total, p);
  *bad = total.bad;
  return std::sqrt(norm_square(total.max, total.ssq));
}

static double exact_norm(const std::vector<float>& xs) {
  long double s = 0;
  for (float x : xs) s += static_cast<long double>(x) * x;
  return static_cast<double>(std::sqrt(s));
}

int main() {
  check(accumulate_element(1.5f, 2.0f, 0.25f, false) == 2.0f, "accumulate adds w * g");
  check(accumulate_element(123.0f, 2.0f, 0.25f, true) == 0.5f, "assign ignores the old value");

  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (float magnitude : {1e-30f, 1e-3f, 1.0f, 1e3f, 1e30f}) {
    std::vector<float> xs(100003);
    for (float& x : xs) x = normal(rng) * magnitude;
    int bad = 0;
    const double exact = exact_norm(xs);
    for (int split : {1, 7, 512}) {
      const double got = norm_of(xs, &bad, split);
      char what[128];
      std::snprintf(what, sizeof what, "norm at magnitude %g, split %d: %.9g vs %.9g", magnitude, split, got, exact);
      // one sequential float32 sum of 1e5 terms drifts more than the kernels' per-thread sums do
      const double tol = split == 1 ? 1e-4 : 1e-5;
      check(std::fabs(got - exact) <= tol * exact && bad == 0, what);
    }
  }
  {  // a plain float32 sum of squares overflows here; the rescaled one does not
    std::vector<float> xs(1000, 3e30f);
    int bad = 0;
    const double got = norm_of(xs, &bad);
    check(std::isfinite(got) && std::fabs(got - 3e30 * std::sqrt(1000.0)) <= 1e-5 * got && bad == 0, "no overflow");
  }
  for (float poison : {std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                       std::numeric_limits<float>::quiet_NaN()}) {
    std::vector<float> xs = {1.0f, 2.0f, poison, 3.0f};
    int bad = 0;
    const double got = norm_of(xs, &bad, 2);
    check(bad == 1, "inf/nan raises the flag");
    check(std::fabs(got - std::sqrt(14.0)) < 1e-6, "inf/nan stay out of the sum");
  }
  {
    int bad = 0;
    check(norm_of(std::vector<float>(10, 0.0f), &bad) == 0.0 && bad == 0, "zeros have norm 0");
  }
  check(clip_scale(10.0, 0.5, -1.0, 1e-6) == 0.5, "no clipping: only the unscale");
  check(std::fabs(clip_scale(10.0, 0.5, 1.0, 1e-6) - 0.5 * 1.0 / (10.0 + 1e-6)) < 1e-15, "clip coefficient");
  check(clip_scale(0.5, 0.25, 1.0, 1e-6) == 0.25, "coefficient clamped at 1");

  // Every element of a chunk is visited exactly once, whole vectors start on vector boundaries,
  // for odd sizes, every thread count, vectorised or not (as the kernels walk their chunks).
  for (int n : {4, 8}) {
    for (int64_t begin : {int64_t{0}, int64_t{16384}}) {
      for (int64_t len : {int64_t{0}, int64_t{1}, int64_t{7}, int64_t{8}, int64_t{9}, int64_t{4095}, int64_t{16384}}) {
        for (int threads : {1, 3, 512}) {
          for (bool vectorised : {true, false}) {
            std::vector<int> seen(static_cast<size_t>(len), 0);
            bool aligned = true;
            for (int t = 0; t < threads; ++t) {
              const Stripes s = stripes(begin, begin + len, t, threads, n, vectorised);
              for (int64_t i = s.vec_begin; i < s.vec_end; i += s.vec_step) {
                aligned = aligned && (i - begin) % n == 0 && i + n <= begin + len;
                for (int k = 0; k < n; ++k) ++seen[static_cast<size_t>(i - begin + k)];
              }
              for (int64_t i = s.tail_begin; i < s.tail_end; i += s.tail_step) ++seen[static_cast<size_t>(i - begin)];
            }
            bool once = true;
            for (int c : seen) once = once && c == 1;
            char what[160];
            std::snprintf(what, sizeof what, "stripes n=%d begin=%lld len=%lld threads=%d vectorised=%d", n,
                          static_cast<long long>(begin), static_cast<long long>(len), threads, vectorised ? 1 : 0);
            check(once && aligned, what);
          }
        }
      }
    }
  }

  // Launch planning: every chunk of every non-empty tensor is one block of exactly one launch, found
  // by the kernels' lookup (tensor_of_block); per-launch block offsets add up; argument blocks fill.
  std::mt19937_64 plan_rng(11);
  const std::vector<std::vector<int64_t>> cases = {
      {}, {0}, {1}, {kChunk}, {kChunk + 1}, {100000000}, {0, 5, 0, 0, 3 * kChunk, 1},
      std::vector<int64_t>(1000, 1), std::vector<int64_t>(300, 2 * kChunk + 7)};
  std::vector<std::vector<int64_t>> all = cases;
  for (int r = 0; r < 20; ++r) {
    std::vector<int64_t> sizes(1 + plan_rng() % 600);
    for (auto& x : sizes) x = (plan_rng() % 5 == 0) ? 0 : static_cast<int64_t>(plan_rng() % (4 * kChunk));
    all.push_back(sizes);
  }
  for (const auto& numels : all) {
    std::vector<std::vector<void*>> addresses(2);
    for (size_t t = 0; t < numels.size(); ++t) {
      addresses[0].push_back(reinterpret_cast<void*>(static_cast<uintptr_t>(t + 1)));
      addresses[1].push_back(reinterpret_cast<void*>(static_cast<uintptr_t>(t + 1) << 20));
    }
    std::map<std::pair<size_t, int64_t>, int> seen;
    bool ok = true;
    int64_t expected_before = 0, launches = 0;
    multi_tensor_apply<2>(addresses, numels, [&](const TensorList<2>& list, int blocks, int64_t before) {
      ++launches;
      ok = ok && before == expected_before && list.tensors > 0 && list.tensors <= TensorList<2>::kMaxTensors;
      expected_before += blocks;
      for (int b = 0; b < blocks; ++b) {
        const int k = tensor_of_block(list, b);
        const size_t t = reinterpret_cast<uintptr_t>(list.addresses[0][k]) - 1;
        const int64_t chunk = b - list.first_block[k];
        ok = ok && k >= 0 && k < list.tensors && t < numels.size() && list.sizes[k] == numels[t] &&
             reinterpret_cast<uintptr_t>(list.addresses[1][k]) == (t + 1) << 20 && chunk >= 0 &&
             chunk < chunks_of(numels[t]);
        ++seen[{t, chunk}];
      }
    });
    int64_t chunks = 0, tensors = 0;
    for (size_t t = 0; t < numels.size(); ++t) {
      chunks += chunks_of(numels[t]);
      tensors += numels[t] > 0;
      for (int64_t c = 0; c < chunks_of(numels[t]); ++c) ok = ok && seen[{t, c}] == 1;
    }
    ok = ok && static_cast<int64_t>(seen.size()) == chunks && expected_before == count_blocks(numels) &&
         launches == (tensors + TensorList<2>::kMaxTensors - 1) / TensorList<2>::kMaxTensors;
    char what[120];
    std::snprintf(what, sizeof what, "launch plan over %zu tensors (%lld chunks)", numels.size(),
                  static_cast<long long>(chunks));
    check(ok, what);
  }

  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
