// Fused CPU kernel for blockwise neighbourhood attention (BNA) on row chunks, fp32, forward and backward.
//
// Geometry (see snapgen/attention/bna.py): the N tokens of an image, in raster order, are cut into n chunks of
// T consecutive tokens; query chunk c attends to the `window` consecutive chunks starting at
// clamp(c - radius, 0, n - window) (NATTEN's border rule: the window shifts at the borders, never shrinks).
// Every window is one contiguous block of span = window * T key/value rows, so each (query chunk, head) is a
// small dense attention whose scores fit in L2.
//
// Why a kernel of our own: PyTorch's CPU flash-attention picks 64-row query blocks for sequences shorter than
// 768 tokens and computes one gradient per overlapping window, which a view's backward must then sum back
// (a zero-filled buffer plus one pass per window). Here the whole chunk is one query block (rows <= 256)
// with an exact one-pass softmax over its window, and the backward accumulates dK/dV straight into the
// key/value gradient rows of the window (GEMM with beta = 1): no window-sized gradient exists.
//
// Layout: heads-last (B, N, heads, d) tensors with unit stride over d; the token stride is the GEMM leading
// dimension, so q/k/v may be strided views (e.g. slices of a fused qkv projection). GQA: query head h reads
// key/value head h / (Hq / Hk).
//
// Threads (at::parallel_for, the same OpenMP pool as PyTorch): the forward splits over (batch, query head,
// chunk, row block); the backward over (batch, key/value head), so each thread owns the dK/dV rows it
// accumulates into -- no atomics, deterministic results.

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);  // BLAS, exported by libtorch_cpu (MKL)

namespace {

// Row-major C (M x N, ldc) = alpha * op(A) * op(B) + beta * C, through column-major sgemm on the transposes.
inline void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                 int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int m = (int)M, n = (int)N, k = (int)K, la = (int)lda, lb = (int)ldb, lc = (int)ldc;
  sgemm_(&tb, &ta, &n, &m, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
}

// NaN and Inf: the kernel is built without -ffinite-math-only, and every step below keeps IEEE semantics, so
// a NaN/Inf in q, k or v gives non-finite outputs exactly where the definition does (tested against it): a
// NaN score makes its row's sum, hence the whole row, NaN; a +Inf score gives Inf - Inf = NaN; an Inf in v
// reaches every query whose window holds it (no probability is exactly 0: see exp_softmax's clamp).

// exp(x) for the softmax arguments (x <= ~0): Cody-Waite reduction x = n ln2 + r, a degree-6 polynomial for
// e^r (Cephes expf coefficients, ~1 ulp), 2^n through the exponent bits. Branch-free, so loops over it
// vectorise (AVX2/AVX-512 with -march=native) without libm calls. A NaN x stays NaN: std::max(NaN, c) returns
// its first argument, so r and p are NaN; and 2^n is read from the bits of a float, not through a float -> int
// conversion (undefined for NaN in C++).
inline float exp_softmax(float x) {
  x = std::max(x, -87.0f);  // below: e^x < 2^-125, clamped to a tiny normal (0 after the sum)
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);  // an integer in [-126, 0]
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // n + 127 (in [1, 127]) is exact in the low mantissa bits of n + 127 + 2^23 (whose ulp is 1)
  const uint32_t biased = std::bit_cast<uint32_t>(n + (127.0f + 8388608.0f)) & 0xFFu;
  return p * std::bit_cast<float>(biased << 23);
}

// The row max in lanes of one native vector register (a GCC/Clang vector type: AVX-512, AVX or SSE/NEON width;
// a type wider than the hardware's would be split into scalars). gcc vectorises a max *reduction* only under
// -ffinite-math-only (without it std::fmax is a libm call per element and std::max a scalar vmaxss chain); an
// element-wise `x > acc ? x : acc` on vector types is one (v)maxps, with IEEE semantics. A NaN score is skipped
// here (the comparison is false) and makes the row NaN in the exp/sum that follows.
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#elif defined(__AVX__)
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;
#endif
using VecF = float __attribute__((vector_size(kVectorBytes)));
float row_max(const float* __restrict s, int64_t n) {
  constexpr int64_t L = kVectorBytes / sizeof(float);
  float m = s[0];
  int64_t j = 0;
  if (n >= L) {
    VecF acc, x;
    std::memcpy(&acc, s, sizeof acc);
    for (j = L; j + L <= n; j += L) {
      std::memcpy(&x, s + j, sizeof x);
      acc = x > acc ? x : acc;
    }
    for (int64_t l = 0; l < L; ++l) m = acc[l] > m ? acc[l] : m;
  }
  for (; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

// Row softmax in place; returns the row's log-sum-exp. Separate functions with restrict pointers so that gcc
// vectorises each loop (inside the parallel lambdas it kept scalar versions).
float softmax_row(float* __restrict s, int64_t n) {
  const float m = row_max(s, n);
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    const float e = exp_softmax(s[j] - m);
    s[j] = e;
    sum += e;
  }
  const float inv = 1.0f / sum;
  for (int64_t j = 0; j < n; ++j) s[j] *= inv;
  return m + std::log(sum);
}

// p = exp(p - lse): the probabilities again, from the forward's log-sum-exp.
void exp_row(float* __restrict p, int64_t n, float lse) {
  for (int64_t j = 0; j < n; ++j) p[j] = exp_softmax(p[j] - lse);
}

// p = p * (dp - delta): the softmax gradient dS, in place of P.
void softmax_grad_row(float* __restrict p, const float* __restrict dp, int64_t n, float delta) {
  for (int64_t j = 0; j < n; ++j) p[j] *= dp[j] - delta;
}

float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc = 0.f;
  for (int64_t x = 0; x < n; ++x) acc += a[x] * b[x];
  return acc;
}

// out = local + w * (end - local), one row.
void lerp_row(const float* __restrict local, const float* __restrict end, float w, float* __restrict out, int64_t n) {
  for (int64_t x = 0; x < n; ++x) out[x] = local[x] + w * (end[x] - local[x]);
}

// The gate mix's backward for one row: d_local = (1 - w) dO, d_end = w dO; returns d_w = <dO, end - local>.
float mix_grad_row(const float* __restrict dO, const float* __restrict local, const float* __restrict end, float w,
                   float* __restrict d_local, float* __restrict d_end, int64_t n) {
  float acc = 0.f;
  for (int64_t x = 0; x < n; ++x) {
    d_local[x] = (1.0f - w) * dO[x];
    d_end[x] = w * dO[x];
    acc += dO[x] * (end[x] - local[x]);
  }
  return acc;
}

struct Geometry {
  int64_t B, N, Hq, Hk, d, T, n, window, radius, span;
  int64_t window_start(int64_t c) const { return std::min(std::max<int64_t>(c - radius, 0), n - window) * T; }
};

Geometry check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t tile_tokens,
                      int64_t window, int64_t radius) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "bna_rows: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "bna_rows: float32 only (got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type(), ")");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "bna_rows: expects heads-last (B, N, heads, d)");
  TORCH_CHECK(k.sizes() == v.sizes(), "bna_rows: k and v must have equal shapes");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "bna_rows: q and k/v disagree in batch, tokens or head size");
  TORCH_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0, "bna_rows: query heads must be a multiple of kv heads");
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->stride(3) == 1, "bna_rows: the head dimension must have unit stride");
  Geometry g{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), tile_tokens, 0, window, radius, 0};
  TORCH_CHECK(g.T > 0 && g.N % g.T == 0, "bna_rows: tile_tokens must divide the token count");
  g.n = g.N / g.T;
  TORCH_CHECK(window >= 1 && window <= g.n && radius >= 0, "bna_rows: need 1 <= window <= chunks, radius >= 0");
  g.span = window * g.T;
  TORCH_CHECK(g.span * g.d < (int64_t)1 << 31 && g.N * g.Hq * g.d < (int64_t)1 << 31, "bna_rows: too large");
  return g;
}

// Query rows per block: the whole chunk up to 256 rows, so a score block stays within L2.
inline int64_t row_block(const Geometry& g) { return std::min<int64_t>(g.T, 256); }

// A heads-last (B, N, heads, d) tensor with unit stride over d: row (b, n) of head h, and the row stride, which
// is the GEMM leading dimension.
struct Rows {
  const float* p = nullptr;
  int64_t sb = 0, sn = 0, sh = 0;
  Rows() = default;
  explicit Rows(const at::Tensor& t) : p(t.data_ptr<float>()), sb(t.stride(0)), sn(t.stride(1)), sh(t.stride(2)) {}
  const float* at(int64_t b, int64_t n, int64_t h) const { return p + b * sb + n * sn + h * sh; }
};

// The ASSA gate mix, optionally fused in: out = lerp(local, end, weight) = local + weight * (end - local), with
// `end` (B, N, Hq, d) the global branch's output (unit stride over d) and `weight` (B, N, Hq) the sigmoid gate.
struct Mix {
  Rows end;
  const float* weight = nullptr;
  explicit operator bool() const { return weight != nullptr; }
};

Mix check_mix(const Geometry& g, const at::Tensor& end, const at::Tensor& weight) {
  TORCH_CHECK(end.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && end.device().is_cpu() &&
              weight.device().is_cpu(), "bna_rows mix: end and weight must be float32 CPU tensors");
  TORCH_CHECK(end.dim() == 4 && end.size(0) == g.B && end.size(1) == g.N && end.size(2) == g.Hq &&
              end.size(3) == g.d && end.stride(3) == 1, "bna_rows mix: end must be (B, N, Hq, d) like q, unit stride over d");
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) == g.B && weight.size(1) == g.N && weight.size(2) == g.Hq &&
              weight.is_contiguous(), "bna_rows mix: weight must be a contiguous (B, N, Hq) tensor");
  Mix m;
  m.end = Rows(end);
  m.weight = weight.data_ptr<float>();
  return m;
}

// Forward. Writes `out` (the local branch, or the mix when `mix`), `lse`, and -- when `local` is non-null --
// the local branch itself (the mixed backward needs it).
void forward_impl(const Geometry& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Mix& mix,
                  float* op, float* local, float* lp) {
  const Rows qr(q), kr(k), vr(v);
  const int64_t osn = g.Hq * g.d, G = g.Hq / g.Hk, QB = row_block(g), blocks = (g.T + QB - 1) / QB;
  const float scale = 1.0f / std::sqrt((float)g.d);
  at::parallel_for(0, g.B * g.Hq * g.n * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> S(QB * g.span), O(mix && !local ? QB * g.d : 0);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t blk = w % blocks, c = (w / blocks) % g.n, h = (w / (blocks * g.n)) % g.Hq;
      const int64_t b = w / (blocks * g.n * g.Hq), hk = h / G;
      const int64_t row0 = c * g.T + blk * QB, rows = std::min(QB, g.T - blk * QB), s0 = g.window_start(c);
      const float* Q = qr.at(b, row0, h);
      const float* K = kr.at(b, s0, hk);
      const float* V = vr.at(b, s0, hk);
      const int64_t ooff = (b * g.N + row0) * osn + h * g.d;
      float* L = lp + (b * g.Hq + h) * g.N + row0;
      gemm(false, true, rows, g.span, g.d, scale, Q, qr.sn, K, kr.sn, 0.f, S.data(), g.span);
      for (int64_t i = 0; i < rows; ++i) L[i] = softmax_row(S.data() + i * g.span, g.span);
      // the local branch goes to `out` (no mix), to `local` (mix, saved), or to a scratch block (mix, inference)
      float* dst = !mix ? op + ooff : (local ? local + ooff : O.data());
      const int64_t ldd = (!mix || local) ? osn : g.d;
      gemm(false, false, rows, g.d, g.span, 1.f, S.data(), g.span, V, vr.sn, 0.f, dst, ldd);
      if (mix) {
        for (int64_t i = 0; i < rows; ++i)
          lerp_row(dst + i * ldd, mix.end.at(b, row0 + i, h), mix.weight[(b * g.N + row0 + i) * g.Hq + h],
                   op + ooff + i * osn, g.d);
      }
    }
  });
}

// Backward. Without `mix`, grad_out is the local branch's gradient; with it, grad_out is the mix's, and the
// kernel also returns the gradients of `end` and `weight` (d_end, d_weight non-null).
void backward_impl(const Geometry& g, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const float* op, const float* lp, const Mix& mix, float* dqp, float* dkp,
                   float* dvp, float* d_end, float* d_weight) {
  const Rows qr(q), kr(k), vr(v), gr(grad_out);
  const int64_t osn = g.Hq * g.d, kvn = g.Hk * g.d, G = g.Hq / g.Hk, QB = row_block(g);
  const float scale = 1.0f / std::sqrt((float)g.d);
  at::parallel_for(0, g.B * g.Hk, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> P(QB * g.span), dP(QB * g.span), delta(QB), dO_local(mix ? QB * g.d : 0);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / g.Hk, hk = w % g.Hk;
      for (int64_t c = 0; c < g.n; ++c) {
        const int64_t s0 = g.window_start(c);
        const float* K = kr.at(b, s0, hk);
        const float* V = vr.at(b, s0, hk);
        float* dK = dkp + (b * g.N + s0) * kvn + hk * g.d;
        float* dV = dvp + (b * g.N + s0) * kvn + hk * g.d;
        for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
          for (int64_t r0 = 0; r0 < g.T; r0 += QB) {
            const int64_t row0 = c * g.T + r0, rows = std::min(QB, g.T - r0);
            const int64_t ooff = (b * g.N + row0) * osn + h * g.d;
            const float* Q = qr.at(b, row0, h);
            const float* dO = gr.at(b, row0, h);
            const float* O = op + ooff;
            const float* L = lp + (b * g.Hq + h) * g.N + row0;
            int64_t ldo = gr.sn;
            if (mix) {  // split the mix's gradient: local (1 - w) dO, end w dO, weight <dO, end - local>
              for (int64_t i = 0; i < rows; ++i) {
                const int64_t t = (b * g.N + row0 + i) * g.Hq + h;
                d_weight[t] = mix_grad_row(dO + i * gr.sn, O + i * osn, mix.end.at(b, row0 + i, h), mix.weight[t],
                                           dO_local.data() + i * g.d, d_end + ooff + i * osn, g.d);
              }
              dO = dO_local.data();
              ldo = g.d;
            }
            // P = softmax(scale * Q K^T), recomputed from the saved log-sum-exp
            gemm(false, true, rows, g.span, g.d, scale, Q, qr.sn, K, kr.sn, 0.f, P.data(), g.span);
            for (int64_t i = 0; i < rows; ++i) {
              exp_row(P.data() + i * g.span, g.span, L[i]);
              delta[i] = dot(O + i * osn, dO + i * ldo, g.d);  // rowsum(dO * O) = rowsum(P * dP)
            }
            gemm(true, false, g.span, g.d, rows, 1.f, P.data(), g.span, dO, ldo, 1.f, dV, kvn);  // dV += P^T dO
            gemm(false, true, rows, g.span, g.d, 1.f, dO, ldo, V, vr.sn, 0.f, dP.data(), g.span);  // dP = dO V^T
            for (int64_t i = 0; i < rows; ++i)  // dS = P * (dP - delta), in place of P
              softmax_grad_row(P.data() + i * g.span, dP.data() + i * g.span, g.span, delta[i]);
            gemm(false, false, rows, g.d, g.span, scale, P.data(), g.span, K, kr.sn, 0.f, dqp + ooff, osn);  // dQ
            gemm(true, false, g.span, g.d, rows, scale, P.data(), g.span, Q, qr.sn, 1.f, dK, kvn);  // dK += s dS^T Q
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> bna_rows_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    int64_t tile_tokens, int64_t window, int64_t radius) {
  const Geometry g = check_inputs(q, k, v, tile_tokens, window, radius);
  at::Tensor out = at::empty({g.B, g.N, g.Hq, g.d}, q.options());
  at::Tensor lse = at::empty({g.B, g.Hq, g.N}, q.options());
  forward_impl(g, q, k, v, Mix{}, out.data_ptr<float>(), nullptr, lse.data_ptr<float>());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bna_rows_mix_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& end, const at::Tensor& weight,
    int64_t tile_tokens, int64_t window, int64_t radius, bool save_local) {
  const Geometry g = check_inputs(q, k, v, tile_tokens, window, radius);
  const Mix mix = check_mix(g, end, weight);
  at::Tensor out = at::empty({g.B, g.N, g.Hq, g.d}, q.options());
  at::Tensor local = save_local ? at::empty({g.B, g.N, g.Hq, g.d}, q.options()) : at::empty({0}, q.options());
  at::Tensor lse = at::empty({g.B, g.Hq, g.N}, q.options());
  forward_impl(g, q, k, v, mix, out.data_ptr<float>(), save_local ? local.data_ptr<float>() : nullptr,
               lse.data_ptr<float>());
  return {out, local, lse};
}

void check_saved(const Geometry& g, const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse) {
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == g.B && grad_out.size(1) == g.N && grad_out.size(2) == g.Hq &&
              grad_out.size(3) == g.d && grad_out.scalar_type() == at::kFloat && grad_out.stride(3) == 1,
              "bna_rows backward: grad_out must be float32 (B, N, Hq, d) like q, unit stride over d");
  TORCH_CHECK(out.sizes() == grad_out.sizes() && out.is_contiguous() && lse.is_contiguous() &&
              lse.numel() == g.B * g.Hq * g.N, "bna_rows backward: out/local and lse must be the forward's outputs");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bna_rows_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, int64_t tile_tokens, int64_t window, int64_t radius) {
  const Geometry g = check_inputs(q, k, v, tile_tokens, window, radius);
  check_saved(g, grad_out, out, lse);
  at::Tensor dq = at::empty({g.B, g.N, g.Hq, g.d}, q.options());
  at::Tensor dk = at::zeros({g.B, g.N, g.Hk, g.d}, k.options());
  at::Tensor dv = at::zeros({g.B, g.N, g.Hk, g.d}, v.options());
  backward_impl(g, grad_out, q, k, v, out.data_ptr<float>(), lse.data_ptr<float>(), Mix{}, dq.data_ptr<float>(),
                dk.data_ptr<float>(), dv.data_ptr<float>(), nullptr, nullptr);
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bna_rows_mix_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& local, const at::Tensor& lse, const at::Tensor& end, const at::Tensor& weight,
    int64_t tile_tokens, int64_t window, int64_t radius) {
  const Geometry g = check_inputs(q, k, v, tile_tokens, window, radius);
  check_saved(g, grad_out, local, lse);
  const Mix mix = check_mix(g, end, weight);
  at::Tensor dq = at::empty({g.B, g.N, g.Hq, g.d}, q.options());
  at::Tensor dk = at::zeros({g.B, g.N, g.Hk, g.d}, k.options());
  at::Tensor dv = at::zeros({g.B, g.N, g.Hk, g.d}, v.options());
  at::Tensor d_end = at::empty({g.B, g.N, g.Hq, g.d}, q.options());
  at::Tensor d_weight = at::empty({g.B, g.N, g.Hq}, q.options());
  backward_impl(g, grad_out, q, k, v, local.data_ptr<float>(), lse.data_ptr<float>(), mix, dq.data_ptr<float>(),
                dk.data_ptr<float>(), dv.data_ptr<float>(), d_end.data_ptr<float>(), d_weight.data_ptr<float>());
  return {dq, dk, dv, d_end, d_weight};
}

}  // namespace

// The op schemas, fake-tensor rules and FLOP formulas are defined in Python (snapgen/attention/cpu_kernel.py),
// so they exist before this library is built; this file only supplies the CPU implementations.
TORCH_LIBRARY_IMPL(snapgen, CPU, m) {
  m.impl("bna_rows_forward", &bna_rows_forward);
  m.impl("bna_rows_backward", &bna_rows_backward);
  m.impl("bna_rows_mix_forward", &bna_rows_mix_forward);
  m.impl("bna_rows_mix_backward", &bna_rows_mix_backward);
}
