// The soft k-means passes over scalar weights (d = 1) with many LUT groups, one pass per call and no
// [g, k, r] intermediate: the map sums (and the output rows), and the two vector-Jacobian products of the
// backward. They compute what core/fused.py's functions compute (the PyTorch definitions and fallback):
//   A_ij   = softmax_j(max(-(x_i - c_j)^2 / tau + min_j (x_i - c_j)^2 / tau, floor))
//   sums   [g, k, 2]: (sum_i w_i A_ij x_i, sum_i w_i A_ij), float64       x_hat [g, r]: sum_j A_ij c_j
//   vjp    [g, k]:   v_j = 2/tau sum_i E_ij (x_i - c_j) + sum_i A_ij G_i,  E_ij = A_ij (B_ij - sum_l A_il B_il),
//                    B_ij = c_j G_i                                         (output_vjp_chunk)
//   dx     [g, r]:   2/tau sum_j E_ij (c_j - x_hat_i) + w_i sum_j A_ij u_j, B_ij = c_j G_i + w_i u_j (x_i - f_j)
//                    (input_grad_chunk; sum_j E_ij = 0, and centring on x_hat keeps G = 1, u = 0, the output
//                    Jacobian 2/tau sum_j A_ij (c_j - x_hat_i)^2, free of cancellation)
// Inputs: x [g, r] float32, w [g, r] float32 row weights or undefined (all ones), c [g, k], tau [g], G [g, r],
// u, f [g, k]; floor the lowest shifted logit (soft_step.exp_floor).
//
// Why: with thousands of LUTs (an LLM's 16-row groups) the per-weight work is the step; the compiled PyTorch
// chunks run at 3-6 ns per (row, centroid) pair on one AVX-512 core, this kernel at about 1 ns.
// AVX-512 path: 16 rows per vector, a row block's k distances / exponentials in a [k][16] buffer on the stack
// (the row minimum and sum are lane-wise: no horizontal reductions), exp by the Cephes polynomial with scalef
// (relative error < 2e-7 on the floored range). Sums over rows are kept in float32 lanes and flushed to float64
// every FLUSH_BLOCKS blocks. Portable path: scalar C++ with std::exp. Threads: at::parallel_for over groups.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define IDKM_X86 1
#include <immintrin.h>
#define TARGET_AVX512 __attribute__((target("avx512f,avx512dq,fma")))
#else
#define IDKM_X86 0
#endif

namespace {

enum Isa : int64_t { kAuto = -1, kPortable = 0, kAvx512 = 2 };
enum Pass { kSums, kVjp, kInputGrad };
constexpr int64_t FLUSH_BLOCKS = 64;  // row blocks of float32 lane sums between float64 flushes (1,024 rows)

// One call's operands as raw pointers; per group g the rows are x + g * r, the centroids c + g * k.
struct Problem {
  int64_t g, r, k;
  const float *x, *w, *c, *tau, *grad, *u, *f;  // w, grad, u, f may be null where the pass does not use them
  float floor;
  double* sums;   // kSums: [g, k, 2]
  float* x_hat;   // kSums: [g, r] or null
  float* v;       // kVjp: [g, k]
  float* dx;      // kInputGrad: [g, r]
};

// ---- portable ------------------------------------------------------------------------------------------------

void group_portable(const Problem& p, Pass pass, int64_t gi, std::vector<float>& a, std::vector<double>& acc) {
  const int64_t k = p.k;
  const float* x = p.x + gi * p.r;
  const float* c = p.c + gi * k;
  const float neg_inv_tau = -1.0f / p.tau[gi];
  std::fill(acc.begin(), acc.end(), 0.0);
  for (int64_t i = 0; i < p.r; ++i) {
    const float xi = x[i];
    float m = INFINITY;
    for (int64_t j = 0; j < k; ++j) {
      const float d = xi - c[j];
      a[j] = d * d;
      m = std::min(m, a[j]);
    }
    float s = 0.0f;
    for (int64_t j = 0; j < k; ++j) {
      a[j] = std::exp(std::max((a[j] - m) * neg_inv_tau, p.floor));
      s += a[j];
    }
    const float inv = 1.0f / s;
    const float wi = p.w ? p.w[gi * p.r + i] : 1.0f;
    if (pass == kSums) {
      float xh = 0.0f;
      for (int64_t j = 0; j < k; ++j) {
        const float aj = a[j] * inv;
        xh += aj * c[j];
        acc[2 * j] += double(aj * wi * xi);
        acc[2 * j + 1] += double(aj * wi);
      }
      if (p.x_hat) p.x_hat[gi * p.r + i] = xh;
      continue;
    }
    const float gr = p.grad[gi * p.r + i];
    const float* u = pass == kInputGrad ? p.u + gi * k : nullptr;
    const float* f = pass == kInputGrad ? p.f + gi * k : nullptr;
    float sab = 0.0f, xh = 0.0f;
    for (int64_t j = 0; j < k; ++j) {
      a[j] *= inv;
      sab += a[j] * (pass == kVjp ? c[j] * gr : c[j] * gr + wi * (u[j] * xi - u[j] * f[j]));
      xh += a[j] * c[j];
    }
    if (pass == kVjp) {
      for (int64_t j = 0; j < k; ++j) {
        const float e = a[j] * (c[j] * gr - sab);
        acc[2 * j] += double(e * (xi - c[j]));
        acc[2 * j + 1] += double(a[j] * gr);
      }
    } else {
      float ec = 0.0f, pull = 0.0f;
      for (int64_t j = 0; j < k; ++j) {
        const float b = c[j] * gr + wi * (u[j] * xi - u[j] * f[j]);
        ec += a[j] * (b - sab) * (c[j] - xh);
        pull += a[j] * u[j];
      }
      p.dx[gi * p.r + i] = 2.0f / p.tau[gi] * ec + pull * wi;
    }
  }
}

// ---- AVX-512 -------------------------------------------------------------------------------------------------

#if IDKM_X86
// exp on [-87, 0] (Cephes expf): n = round(t log2 e), t - n ln 2 in two parts, a degree-6 polynomial, 2^n by scalef.
TARGET_AVX512 inline __m512 exp512(__m512 t) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(t, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), t);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 q = _mm512_set1_ps(1.9875691500e-4f);
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.3981999507e-3f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(8.3334519073e-3f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(4.1665795894e-2f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.6666665459e-1f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(q, r), r, r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, n);
}

TARGET_AVX512 inline double lane_sum(__m512 v) {
  const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
  const __m512d hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1));
  return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
}

// buf [k][16] floats and lanes [2k] vectors: scratch owned by the calling thread.
TARGET_AVX512 void group_avx512(const Problem& p, Pass pass, int64_t gi, float* buf, __m512* lanes,
                                std::vector<double>& acc) {
  const int64_t k = p.k, r = p.r;
  const float* x = p.x + gi * r;
  const float* c = p.c + gi * k;
  const float* w = p.w ? p.w + gi * r : nullptr;
  const float* grad = p.grad ? p.grad + gi * r : nullptr;
  const float* u = pass == kInputGrad ? p.u + gi * k : nullptr;
  const float* f = pass == kInputGrad ? p.f + gi * k : nullptr;
  const __m512 neg_inv_tau = _mm512_set1_ps(-1.0f / p.tau[gi]);
  const __m512 two_over_tau = _mm512_set1_ps(2.0f / p.tau[gi]);
  const __m512 floor = _mm512_set1_ps(p.floor);
  std::fill(acc.begin(), acc.end(), 0.0);
  for (int64_t j = 0; j < 2 * k; ++j) lanes[j] = _mm512_setzero_ps();
  int64_t blocks = 0;
  for (int64_t i0 = 0; i0 < r; i0 += 16) {
    const int64_t len = std::min<int64_t>(16, r - i0);
    const __mmask16 live = len == 16 ? __mmask16(0xFFFF) : __mmask16((1u << len) - 1);
    const __m512 xv = _mm512_maskz_loadu_ps(live, x + i0);
    // dead lanes weigh 0 (and get G = 0), so they add nothing to any sum
    const __m512 wv = w ? _mm512_maskz_loadu_ps(live, w + i0) : _mm512_maskz_mov_ps(live, _mm512_set1_ps(1.0f));
    __m512 m = _mm512_set1_ps(INFINITY);
    for (int64_t j = 0; j < k; ++j) {
      const __m512 d = _mm512_sub_ps(xv, _mm512_set1_ps(c[j]));
      const __m512 d2 = _mm512_mul_ps(d, d);
      _mm512_store_ps(buf + 16 * j, d2);
      m = _mm512_min_ps(m, d2);
    }
    __m512 s = _mm512_setzero_ps();
    for (int64_t j = 0; j < k; ++j) {
      const __m512 t = _mm512_mul_ps(_mm512_sub_ps(_mm512_load_ps(buf + 16 * j), m), neg_inv_tau);
      const __m512 e = exp512(_mm512_max_ps(t, floor));
      _mm512_store_ps(buf + 16 * j, e);
      s = _mm512_add_ps(s, e);
    }
    const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), s);
    if (pass == kSums) {
      __m512 xh = _mm512_setzero_ps();
      for (int64_t j = 0; j < k; ++j) {
        const __m512 a = _mm512_mul_ps(_mm512_load_ps(buf + 16 * j), inv);
        xh = _mm512_fmadd_ps(a, _mm512_set1_ps(c[j]), xh);
        const __m512 aw = _mm512_mul_ps(a, wv);
        lanes[2 * j] = _mm512_fmadd_ps(aw, xv, lanes[2 * j]);
        lanes[2 * j + 1] = _mm512_add_ps(lanes[2 * j + 1], aw);
      }
      if (p.x_hat) _mm512_mask_storeu_ps(p.x_hat + gi * r + i0, live, xh);
    } else {
      const __m512 gv = _mm512_maskz_loadu_ps(live, grad + i0);
      __m512 sab = _mm512_setzero_ps(), xh = _mm512_setzero_ps();
      for (int64_t j = 0; j < k; ++j) {
        const __m512 a = _mm512_mul_ps(_mm512_load_ps(buf + 16 * j), inv);
        _mm512_store_ps(buf + 16 * j, a);
        xh = _mm512_fmadd_ps(a, _mm512_set1_ps(c[j]), xh);
        __m512 b = _mm512_mul_ps(_mm512_set1_ps(c[j]), gv);
        if (pass == kInputGrad) {
          const __m512 fixed = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(u[j]), xv), _mm512_set1_ps(u[j] * f[j]));
          b = _mm512_fmadd_ps(wv, fixed, b);
        }
        sab = _mm512_fmadd_ps(a, b, sab);
      }
      if (pass == kVjp) {
        for (int64_t j = 0; j < k; ++j) {
          const __m512 a = _mm512_load_ps(buf + 16 * j);
          const __m512 cj = _mm512_set1_ps(c[j]);
          const __m512 e = _mm512_mul_ps(a, _mm512_fmsub_ps(cj, gv, sab));
          lanes[2 * j] = _mm512_fmadd_ps(e, _mm512_sub_ps(xv, cj), lanes[2 * j]);
          lanes[2 * j + 1] = _mm512_fmadd_ps(a, gv, lanes[2 * j + 1]);
        }
      } else {
        __m512 ec = _mm512_setzero_ps(), pull = _mm512_setzero_ps();
        for (int64_t j = 0; j < k; ++j) {
          const __m512 a = _mm512_load_ps(buf + 16 * j);
          const __m512 cj = _mm512_set1_ps(c[j]), uj = _mm512_set1_ps(u[j]);
          const __m512 fixed = _mm512_sub_ps(_mm512_mul_ps(uj, xv), _mm512_set1_ps(u[j] * f[j]));
          const __m512 b = _mm512_fmadd_ps(wv, fixed, _mm512_mul_ps(cj, gv));
          ec = _mm512_fmadd_ps(_mm512_mul_ps(a, _mm512_sub_ps(b, sab)), _mm512_sub_ps(cj, xh), ec);
          pull = _mm512_fmadd_ps(a, uj, pull);
        }
        _mm512_mask_storeu_ps(p.dx + gi * r + i0, live, _mm512_fmadd_ps(two_over_tau, ec, _mm512_mul_ps(pull, wv)));
      }
    }
    if (pass != kInputGrad && (++blocks == FLUSH_BLOCKS || i0 + 16 >= r)) {
      for (int64_t j = 0; j < 2 * k; ++j) {
        acc[j] += lane_sum(lanes[j]);
        lanes[j] = _mm512_setzero_ps();
      }
      blocks = 0;
    }
  }
}

bool has_avx512() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq"); }
#else
bool has_avx512() { return false; }
#endif

bool use_avx512(int64_t isa) {
  TORCH_CHECK(isa == kAuto || isa == kPortable || isa == kAvx512, "soft k-means: unknown isa ", isa);
  const bool ok = has_avx512();
  TORCH_CHECK(isa != kAvx512 || ok, "soft k-means: this CPU has no AVX-512");
  return isa == kAuto ? ok : isa == kAvx512;
}

void run(const Problem& p, Pass pass, int64_t isa) {
  const bool avx512 = use_avx512(isa);
  at::parallel_for(0, p.g, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> acc(2 * p.k);
#if IDKM_X86
    // [k][16] exponentials, then [2k][16] lane sums, 64-byte aligned
    std::vector<float> scratch(avx512 ? 16 * 3 * p.k + 16 : 0);
    float* buf = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(scratch.data()) + 63) & ~uintptr_t(63));
    __m512* lanes = reinterpret_cast<__m512*>(buf + 16 * p.k);
#endif
    std::vector<float> a(p.k);
    for (int64_t gi = begin; gi < end; ++gi) {
#if IDKM_X86
      if (avx512)
        group_avx512(p, pass, gi, buf, lanes, acc);
      else
#endif
        group_portable(p, pass, gi, a, acc);
      if (pass == kSums) {
        std::copy(acc.begin(), acc.end(), p.sums + gi * 2 * p.k);
      } else if (pass == kVjp) {
        const double two_over_tau = 2.0 / p.tau[gi];
        for (int64_t j = 0; j < p.k; ++j) p.v[gi * p.k + j] = float(two_over_tau * acc[2 * j] + acc[2 * j + 1]);
      }
    }
  });
}

void check_operands(const at::Tensor& x, const c10::optional<at::Tensor>& w, const at::Tensor& c, const at::Tensor& tau) {
  auto f32 = [](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), "soft k-means: ", name,
                " must be a contiguous float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
  };
  f32(x, "x");
  f32(c, "c");
  f32(tau, "tau");
  TORCH_CHECK(x.dim() == 2 && c.dim() == 2 && c.size(0) == x.size(0) && tau.numel() == x.size(0),
              "soft k-means: expected x [g, r], c [g, k], tau [g]; got x ", x.sizes(), ", c ", c.sizes(), ", tau ",
              tau.sizes());
  if (w && w->defined()) {
    f32(*w, "w");
    TORCH_CHECK(w->sizes() == x.sizes(), "soft k-means: row weights ", w->sizes(), " must match x ", x.sizes());
  }
}

Problem problem(const at::Tensor& x, const c10::optional<at::Tensor>& w, const at::Tensor& c, const at::Tensor& tau,
                double floor) {
  Problem p{};
  p.g = x.size(0);
  p.r = x.size(1);
  p.k = c.size(1);
  p.x = x.data_ptr<float>();
  p.w = w && w->defined() ? w->data_ptr<float>() : nullptr;
  p.c = c.data_ptr<float>();
  p.tau = tau.data_ptr<float>();
  p.floor = float(floor);
  return p;
}

std::tuple<at::Tensor, at::Tensor> soft_kmeans_sums(const at::Tensor& x, const c10::optional<at::Tensor>& w,
                                                    const at::Tensor& c, const at::Tensor& tau, double floor,
                                                    bool with_output, int64_t isa) {
  check_operands(x, w, c, tau);
  Problem p = problem(x, w, c, tau, floor);
  at::Tensor sums = at::empty({p.g, p.k, 2}, x.options().dtype(at::kDouble));
  at::Tensor x_hat = with_output ? at::empty_like(x) : at::empty({0}, x.options());
  p.sums = sums.data_ptr<double>();
  p.x_hat = with_output ? x_hat.data_ptr<float>() : nullptr;
  run(p, kSums, isa);
  return {sums, x_hat};
}

at::Tensor soft_kmeans_output_vjp(const at::Tensor& x, const at::Tensor& c, const at::Tensor& tau,
                                  const at::Tensor& grad, double floor, int64_t isa) {
  check_operands(x, grad, c, tau);
  Problem p = problem(x, c10::nullopt, c, tau, floor);
  p.grad = grad.data_ptr<float>();
  at::Tensor v = at::empty({p.g, p.k}, x.options());
  p.v = v.data_ptr<float>();
  run(p, kVjp, isa);
  return v;
}

at::Tensor soft_kmeans_input_grad(const at::Tensor& x, const c10::optional<at::Tensor>& w, const at::Tensor& c,
                                  const at::Tensor& tau, const at::Tensor& grad, const at::Tensor& u,
                                  const at::Tensor& f, double floor, int64_t isa) {
  check_operands(x, w, c, tau);
  check_operands(x, grad, u, tau);
  check_operands(x, grad, f, tau);
  TORCH_CHECK(u.sizes() == c.sizes() && f.sizes() == c.sizes(), "soft k-means: u and f must be [g, k] like c");
  Problem p = problem(x, w, c, tau, floor);
  p.grad = grad.data_ptr<float>();
  p.u = u.data_ptr<float>();
  p.f = f.data_ptr<float>();
  at::Tensor dx = at::empty_like(x);
  p.dx = dx.data_ptr<float>();
  run(p, kInputGrad, isa);
  return dx;
}

std::vector<int64_t> soft_kmeans_isas() {
  std::vector<int64_t> isas{kPortable};
  if (has_avx512()) isas.push_back(kAvx512);
  return isas;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(idkm_plugin, m) {
  m.def("soft_kmeans_sums(Tensor x, Tensor? w, Tensor c, Tensor tau, float floor, bool with_output, int isa=-1)"
        " -> (Tensor, Tensor)");
  m.def("soft_kmeans_output_vjp(Tensor x, Tensor c, Tensor tau, Tensor grad, float floor, int isa=-1) -> Tensor");
  m.def("soft_kmeans_input_grad(Tensor x, Tensor? w, Tensor c, Tensor tau, Tensor grad, Tensor u, Tensor f,"
        " float floor, int isa=-1) -> Tensor");
  m.def("soft_kmeans_isas() -> int[]", &soft_kmeans_isas);
}

TORCH_LIBRARY_IMPL(idkm_plugin, CPU, m) {
  m.impl("soft_kmeans_sums", &soft_kmeans_sums);
  m.impl("soft_kmeans_output_vjp", &soft_kmeans_output_vjp);
  m.impl("soft_kmeans_input_grad", &soft_kmeans_input_grad);
}
