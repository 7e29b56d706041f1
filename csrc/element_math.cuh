// Element arithmetic shared by the kernels (device) and the host-compiled header test.
// Everything here is plain C++ when not compiled by nvcc, so `g++ tests/csrc/test_element_math.cpp`
// exercises the same code the GPU runs.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define AA_HD __host__ __device__ __forceinline__
#else
#define AA_HD inline
#endif

namespace autoaccum {

// acc = w * g (assign) or acc + w * g, in float32 whatever g's storage type was.
AA_HD float accumulate_element(float acc, float g, float w, bool assign) {
  return assign ? w * g : acc + w * g;
}

// Which elements of [begin, end) one thread handles: whole vectors of `n` elements (128-bit
// accesses) from `begin` up to the last whole vector, thread t taking vectors t, t + threads, ...;
// then the scalar tail, element by element. Unaligned data (`vectorised` false) is all tail.
struct Stripes {
  int64_t vec_begin, vec_end, vec_step;
  int64_t tail_begin, tail_end, tail_step;
};

AA_HD Stripes stripes(int64_t begin, int64_t end, int thread, int threads, int n, bool vectorised) {
  const int64_t body_end = vectorised ? begin + ((end - begin) / n) * n : begin;
  return Stripes{begin + static_cast<int64_t>(thread) * n, body_end, static_cast<int64_t>(threads) * n,
                 body_end + thread, end, threads};
}

// Running 2-norm without overflow or underflow: sum((|x| / max)^2) rescaled as max grows
// (LAPACK's nrm2 idea), plus a flag for inf/nan, which do not enter the sum.
struct NormState {
  float max;
  float ssq;
  int bad;
};

AA_HD NormState norm_empty() { return NormState{0.0f, 0.0f, 0}; }

AA_HD void norm_update(NormState& s, float x) {
  float ax = fabsf(x);
  if (!(ax < INFINITY)) {  // inf, or nan (every comparison with nan is false)
    s.bad = 1;
    return;
  }
  if (ax > s.max) {
    float r = s.max / ax;
    s.ssq = s.ssq * r * r + 1.0f;
    s.max = ax;
  } else if (ax > 0.0f) {
    float r = ax / s.max;
    s.ssq += r * r;
  }
}

AA_HD NormState norm_merge(NormState a, NormState b) {
  NormState out;
  out.bad = a.bad | b.bad;
  out.max = a.max > b.max ? a.max : b.max;
  if (out.max == 0.0f) {
    out.ssq = 0.0f;
    return out;
  }
  float ra = a.max / out.max, rb = b.max / out.max;
  out.ssq = a.ssq * ra * ra + b.ssq * rb * rb;
  return out;
}

// A partial's contribution to the sum of squares, in double: max^2 * ssq cannot overflow there.
AA_HD double norm_square(float max, float ssq) {
  double m = static_cast<double>(max);
  return m * m * static_cast<double>(ssq);
}

// The factor applied to the scaled gradients: inv_scale * min(1, max_norm / (norm + eps)),
// clip_grad_norm_'s coefficient; max_norm < 0 means no clipping.
AA_HD double clip_scale(double norm, double inv_scale, double max_norm, double eps) {
  if (max_norm < 0.0) return inv_scale;
  double coef = max_norm / (norm + eps);
  return inv_scale * (coef < 1.0 ? coef : 1.0);
}

}  // namespace autoaccum
