// gaaf_patch's CPU backward kernel: dx = dy * (phi'(x) + h * s~(x)) in one vectorised pass, or with the auto gain
// (gaaf_patch/gain.py) dx = dy * (phi'(x) + h * s~(x) * (u - v * phi'(x))): u = the activation's linear slope, v = 1,
// h = the blend coefficient c. v = 0, u = 1 is the paper's form, computed exactly as before. With delta >= 0 the kernel
// first works out c itself (gaaf_patch.gain.coefficient): the second moments of phi' and of st = s~ (u - phi') on every
// `step`-th element of `t` in memory order (all of it when it holds at most 2 * samples), then the root of
// a c^2 + 2 b c - delta A = 0 clipped to [0, 1]; gaaf_patch/gain.py computes the same in torch ops where this kernel
// does not run.
//
// The plain-ops backward (gaaf_patch/ops.py) makes 4-6 passes over the tensor (PyTorch's own `*_backward`, the
// inverse for output-saved activations, the shape, the final addcmul), each an operator dispatch and an
// allocation. This file fuses them, with ATen's `Vectorized<T>` (the SLEEF transcendentals ATen and Inductor's C++
// kernels use) and `at::parallel_for`, and registers one operator: torch.ops.gaaf_patch.backward.
//
// act (what phi'(x) is, and what `t` holds):
//   0 tanh      t = y = tanh(x):     phi' = 1 - y^2,     x = atanh(y) = log2((1 + y) / (1 - y)) ln(2) / 2
//   1 sigmoid   t = y = sigmoid(x):  phi' = y (1 - y),   x = logit(y) = log2(y / (1 - y)) ln(2)
//   2 relu      t = x (or y: same sign):  phi' = [t > 0] (PyTorch's threshold_backward: 0 at t == 0)
//   3 given     `base` already holds dy * phi'(x) (PyTorch's kernel), t = x: only the shape term is added
//   4 tanh      t = x (sawtooth mode saves the input): phi' = 1 - tanh(x)^2
//   5 sigmoid   t = x:                                 phi' = sigmoid(x) (1 - sigmoid(x))
// shape (s~, with s = h s~):
//   0 gauss            s~ = exp2(a (x - b)^2)           (a = -log2(e) / (width scale^2), b = center)
//   1 shifted_sigmoid  s~ = sigmoid(a (x + b))          (a = slope, b = shift)
//   2 band             s~ = sigmoid(a (x - b)) sigmoid(a (c - x))   (a = slope, b = lo - margin, c = hi + margin)
//
// The Python side (gaaf_patch/kernels.py) builds this on first use and falls back to the plain ops when it cannot.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <vector>

namespace {

using at::vec::Vectorized;

constexpr int64_t kGrain = 32768;  // ATen's internal::GRAIN_SIZE for pointwise kernels

// log2 and exp2 for the shape term: SLEEF's 3.5-ulp versions for float32 where ATen's vector code is built for AVX2 or
// AVX512 (the 1-ulp ones ATen's Vectorized calls cost 1.5-2x more, and s is a heuristic shape, not a quantity that
// needs its last ulp); ATen's otherwise and for float64.
template <typename T>
inline Vectorized<T> log2_(Vectorized<T> v) { return v.log2(); }
template <typename T>
inline Vectorized<T> exp2_(Vectorized<T> v) { return v.exp2(); }
#if defined(CPU_CAPABILITY_AVX512)
template <>
inline Vectorized<float> log2_(Vectorized<float> v) { return Vectorized<float>(Sleef_log2f16_u35(v)); }
template <>
inline Vectorized<float> exp2_(Vectorized<float> v) { return Vectorized<float>(Sleef_exp2f16_u35(v)); }
#elif defined(CPU_CAPABILITY_AVX2)
template <>
inline Vectorized<float> log2_(Vectorized<float> v) { return Vectorized<float>(Sleef_log2f8_u35(v)); }
template <>
inline Vectorized<float> exp2_(Vectorized<float> v) { return Vectorized<float>(Sleef_exp2f8_u35(v)); }
#endif

constexpr double kLn2 = 0.693147180559945309417232121458176568;
constexpr double kLog2e = 1.442695040888963407359924681001892137;

template <typename T>
struct Args {
  T a, b, c, h, u, v;
};

template <typename T, int Act, int Shape>
inline Vectorized<T> step(Vectorized<T> g, Vectorized<T> t, Vectorized<T> base, const Args<T>& p) {
  using V = Vectorized<T>;
  const V one(T(1)), zero(T(0));
  V dphi_g, x;
  if constexpr (Act == 0) {
    dphi_g = g * (one - t * t);
    x = log2_((one + t) / (one - t)) * V(T(0.5 * kLn2));  // atanh(y), at half the cost of SLEEF's atanh
  } else if constexpr (Act == 1) {
    dphi_g = g * (t * (one - t));
    x = log2_(t / (one - t)) * V(T(kLn2));  // logit(y)
  } else if constexpr (Act == 2) {
    dphi_g = V::blendv(g, zero, t <= zero);  // as threshold_backward: NaN passes dy
    x = t;
  } else if constexpr (Act == 3) {
    dphi_g = base;
    x = t;
  } else if constexpr (Act == 4) {
    V y = t.tanh();
    dphi_g = g * (one - y * y);
    x = t;
  } else {
    V y = one / (one + exp2_(t * V(T(-kLog2e))));
    dphi_g = g * (y * (one - y));
    x = t;
  }
  V s;
  if constexpr (Shape == 0) {
    V z = x - V(p.b);
    s = exp2_(V(p.a) * z * z);
  } else if constexpr (Shape == 1) {
    s = one / (one + exp2_((x + V(p.b)) * V(T(-kLog2e) * p.a)));
  } else {
    const V k(T(-kLog2e) * p.a);
    s = one / ((one + exp2_((x - V(p.b)) * k)) * (one + exp2_((V(p.c) - x) * k)));
  }
  if (p.v == T(0)) return at::vec::fmadd(V(p.h) * g, s, dphi_g);
  return at::vec::fmadd(V(p.h) * s, at::vec::fmsub(V(p.u), g, V(p.v) * dphi_g), dphi_g);
}

// The second moments of phi' and of st = s~ (u - phi') over m values, with `step` itself: h = 0 gives phi' (dy = 1),
// h = 1 the whole blend phi' + st. Returns {A, a, b} = sums of phi'^2, st^2, phi' st.
template <typename T, int Act, int Shape>
std::array<double, 3> moments(const T* buf, int64_t m, Args<T> p) {
  using V = Vectorized<T>;
  const V one(T(1)), zero(T(0));
  Args<T> pd = p, pm = p;
  pd.h = T(0), pd.v = T(1), pm.h = T(1), pm.v = T(1);
  V sA(zero), sa(zero), sb(zero);
  for (int64_t i = 0; i < m; i += V::size()) {
    const int64_t rest = std::min<int64_t>(V::size(), m - i);
    const V t = rest == V::size() ? V::loadu(buf + i) : V::loadu(buf + i, rest);
    V d = step<T, Act, Shape>(one, t, zero, pd);
    V st = step<T, Act, Shape>(one, t, zero, pm) - d;
    if (rest < V::size()) d = V::set(zero, d, rest), st = V::set(zero, st, rest);  // the tail's padding lanes
    sA = at::vec::fmadd(d, d, sA), sa = at::vec::fmadd(st, st, sa), sb = at::vec::fmadd(d, st, sb);
  }
  T lanes[3][V::size()];
  sA.store(lanes[0]), sa.store(lanes[1]), sb.store(lanes[2]);
  std::array<double, 3> out{0, 0, 0};
  for (int k = 0; k < 3; ++k)
    for (int64_t j = 0; j < V::size(); ++j) out[k] += double(lanes[k][j]);
  return out;
}

template <typename T>
double blend_coefficient(const T* t, int64_t n, int64_t samples, int64_t act, int64_t shape, const Args<T>& p,
                         double delta) {
  int64_t step_ = 1;
  if (n > 2 * samples) {
    step_ = n / samples;
    step_ += 1 - step_ % 2;  // odd: a power-of-two channel count is not aliased
  }
  std::vector<T> buf;
  buf.reserve(n / step_ + 1);
  for (int64_t i = 0; i < n; i += step_) buf.push_back(t[i]);
  const int64_t m = int64_t(buf.size());
  if (m == 0) return 0.0;
  std::array<double, 3> q{0, 0, 0};
#define GAAF_CASE(A, S) \
  if (act == A && shape == S) q = moments<T, A, S>(buf.data(), m, p);
  GAAF_CASE(0, 0) GAAF_CASE(0, 1) GAAF_CASE(0, 2) GAAF_CASE(1, 0) GAAF_CASE(1, 1) GAAF_CASE(1, 2)
  GAAF_CASE(2, 0) GAAF_CASE(2, 1) GAAF_CASE(2, 2) GAAF_CASE(4, 0) GAAF_CASE(4, 1) GAAF_CASE(4, 2)
  GAAF_CASE(5, 0) GAAF_CASE(5, 1) GAAF_CASE(5, 2)
#undef GAAF_CASE
  const double A = q[0] / m, qa = q[1] / m, qb = q[2] / m;
  if (!(qa > 0)) return 0.0;
  const double root = std::sqrt(qb * qb + qa * delta * A);
  const double cc = (qb >= 0 && root + qb > 0) ? delta * A / (root + qb) : (root - qb) / qa;
  return std::isfinite(cc) ? std::clamp(cc, 0.0, 1.0) : 0.0;
}

template <typename T, int Act, int Shape>
void run(const T* g, const T* t, const T* base, T* out, int64_t n, const Args<T>& p) {
  using V = Vectorized<T>;
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + V::size() <= end; i += V::size()) {
      V b = base ? V::loadu(base + i) : V(T(0));
      step<T, Act, Shape>(V::loadu(g + i), V::loadu(t + i), b, p).store(out + i);
    }
    if (i < end) {
      const int64_t rest = end - i;
      V b = base ? V::loadu(base + i, rest) : V(T(0));
      step<T, Act, Shape>(V::loadu(g + i, rest), V::loadu(t + i, rest), b, p).store(out + i, rest);
    }
  });
}

template <typename T>
void dispatch(const T* g, const T* t, const T* base, T* out, int64_t n, int64_t act, int64_t shape, const Args<T>& p) {
#define GAAF_CASE(A, S) \
  if (act == A && shape == S) return run<T, A, S>(g, t, base, out, n, p);
  GAAF_CASE(0, 0) GAAF_CASE(0, 1) GAAF_CASE(1, 0) GAAF_CASE(1, 1)
  GAAF_CASE(2, 0) GAAF_CASE(2, 1) GAAF_CASE(3, 0) GAAF_CASE(3, 1)
  GAAF_CASE(4, 0) GAAF_CASE(4, 1) GAAF_CASE(5, 0) GAAF_CASE(5, 1)
  GAAF_CASE(0, 2) GAAF_CASE(1, 2) GAAF_CASE(2, 2) GAAF_CASE(3, 2) GAAF_CASE(4, 2) GAAF_CASE(5, 2)
#undef GAAF_CASE
  TORCH_CHECK(false, "gaaf_patch.backward: unknown act/shape ", act, "/", shape);
}

at::Tensor backward(const at::Tensor& gy, const at::Tensor& t, const std::optional<at::Tensor>& base, int64_t act,
                    int64_t shape, double a, double b, double c, double h, double u, double v, double delta,
                    int64_t samples) {
  TORCH_CHECK(gy.device().is_cpu() && t.device().is_cpu(), "gaaf_patch.backward: CPU tensors only");
  TORCH_CHECK(gy.scalar_type() == t.scalar_type() && gy.sizes() == t.sizes(),
              "gaaf_patch.backward: dy and the saved tensor must have one dtype and one shape");
  TORCH_CHECK((act == 3) == base.has_value(), "gaaf_patch.backward: `base` goes with act 3 only");
  // One flat pass over memory when all operands share one dense layout (contiguous, channels_last, ...): the result
  // keeps it. Otherwise everything is made contiguous first.
  const bool same_layout = t.is_non_overlapping_and_dense() && gy.strides() == t.strides() &&
                           (!base || base->strides() == t.strides());
  at::Tensor g = same_layout ? gy : gy.contiguous(), tc = same_layout ? t : t.contiguous();
  at::Tensor bc, out;
  if (base) {
    TORCH_CHECK(base->scalar_type() == t.scalar_type() && base->sizes() == t.sizes(), "gaaf_patch.backward: bad base");
    bc = same_layout ? *base : base->contiguous();
    out = bc;  // written in place: `base` is the caller's fresh buffer (or our contiguous copy of it)
  } else {
    out = at::empty_like(tc);  // same strides as tc (dense)
  }
  const int64_t n = tc.numel();
  if (delta >= 0) {  // the auto gain: c from the sampled moments, then the blend toward the slope u
    TORCH_CHECK(act != 3, "gaaf_patch.backward: the blend coefficient needs phi', which act 3 does not compute");
    const double cc =
        tc.scalar_type() == at::kFloat
            ? blend_coefficient<float>(tc.const_data_ptr<float>(), n, samples, act, shape,
                                       Args<float>{float(a), float(b), float(c), 0.f, float(u), 1.f}, delta)
            : blend_coefficient<double>(tc.const_data_ptr<double>(), n, samples, act, shape,
                                        Args<double>{a, b, c, 0.0, u, 1.0}, delta);
    h = cc, v = 1.0;
  }
  if (tc.scalar_type() == at::kFloat) {
    dispatch<float>(g.const_data_ptr<float>(), tc.const_data_ptr<float>(), base ? bc.const_data_ptr<float>() : nullptr,
                    out.mutable_data_ptr<float>(), n, act, shape,
                    Args<float>{float(a), float(b), float(c), float(h), float(u), float(v)});
  } else if (tc.scalar_type() == at::kDouble) {
    dispatch<double>(g.const_data_ptr<double>(), tc.const_data_ptr<double>(),
                     base ? bc.const_data_ptr<double>() : nullptr, out.mutable_data_ptr<double>(), n, act, shape,
                     Args<double>{a, b, c, h, u, v});
  } else {
    TORCH_CHECK(false, "gaaf_patch.backward: float32 or float64 only, got ", tc.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(gaaf_patch, m) {
  m.def("backward(Tensor gy, Tensor t, Tensor? base, int act, int shape, float a, float b, float c, float h, float u, float v, float delta, int samples) -> Tensor");
}

TORCH_LIBRARY_IMPL(gaaf_patch, CPU, m) { m.impl("backward", &backward); }
