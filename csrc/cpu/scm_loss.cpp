// CPU kernels of the sCM loss (A14-A17): torch.ops.scm.scm_loss / scm_loss_backward / scm_loss_jvp.
//
// Per sample b (D elements, ct = cos t_b, st = sin t_b, w = exp(-logvar_b) or 1):
//   (A14) g_i   = a_fm * Fm_i + a_dx * dx_i + a_x * x_i + a_j * J_i
//               a_fm = -ct^2 sigma_d, a_dx = ct^2, a_x = -r ct st, a_j = -r sigma_d
//   (A16) gnorm = ||g||_2,  g^ = g / (gnorm + c)
//   (A17) e_i   = F_i - Fm_i - g^_i,  sqerr = ||e||^2,  loss = w / D * sqerr + logvar_b
//   backward: dF_i = grad_b * 2 w / D * e_i;  jvp: dot_b = sum_i e_i * Fdot_i.
// Without F_minus, F^- = F.detach() and e = -g^ exactly (the kernels read F in F^-'s place).
//
// Parallelism: every sample is cut into fixed segments of kSeg elements and the (sample, segment)
// pairs are the tasks of at::parallel_for, so a batch smaller than the thread count still keeps
// every thread busy. Each task writes its fp32 partial sum into its own slot; the partials of a
// sample are then added in segment order. The split depends only on D (never on the thread count
// or the schedule), so results are bitwise reproducible for any number of threads.
// Within a segment, operands are converted chunk by chunk (kChunk elements) into fp32 buffers
// (fp32 operands are read in place) and the inner loops are branch-free and vectorizable.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "common.h"
#include "scm/math.h"

namespace scm::cpu {
namespace {

// Elements per task: 16 chunks, so that a task amortizes its scheduling cost.
constexpr int64_t kSeg = 16 * kChunk;
// Independent accumulators of the reductions (vector lanes; folded in a fixed order).
constexpr int kLanes = 16;


// One (B, D) operand: its rows and dtype.
struct Operand {
  const char* base = nullptr;
  int64_t row_bytes = 0;  // row stride in bytes (0 for an operand broadcast over the batch)
  int64_t elem = 0;       // element size in bytes
  at::ScalarType dt = at::kFloat;

  Operand() = default;
  explicit Operand(const at::Tensor& x)
      : base(static_cast<const char*>(x.const_data_ptr())),
        row_bytes(x.stride(0) * x.element_size()),
        elem(x.element_size()),
        dt(x.scalar_type()) {}

  // fp32 values of elements [i0, i0 + n) of row b: in place when the operand is fp32, else
  // converted into buf.
  const float* load(int64_t b, int64_t i0, int64_t n, float* buf) const {
    const char* p = base + b * row_bytes + i0 * elem;
    if (dt == at::kFloat) return reinterpret_cast<const float*>(p);
    load_f32(p, dt, n, buf);
    return buf;
  }
};

// Per-sample scalar from a (B,) float32 tensor with a free stride.
struct Scalars {
  const float* p = nullptr;
  int64_t stride = 0;
  Scalars() = default;
  explicit Scalars(const at::Tensor& x) : p(x.const_data_ptr<float>()), stride(x.stride(0)) {}
  float operator[](int64_t b) const { return p[b * stride]; }
};

struct Inputs {
  Operand F, J, x, dx, Fm;
  bool has_fm = false;
  Scalars t;
  float sigma_d = 0.5f, r = 1.f, c = 0.1f;
};

// Scratch buffers of one task (stack: 5 * 2 KiB); only non-fp32 operands are converted into them.
struct Buffers {
  float f[kChunk], j[kChunk], x[kChunk], dx[kChunk], fm[kChunk];
};

// fp32 views of one chunk of the operands. fm is nullptr without F_minus (then F^- = F and
// F - F^- is exactly zero).
struct Chunk {
  const float *f, *fm, *dx, *x, *j;
};

inline Chunk load_chunk(const Inputs& in, int64_t b, int64_t i0, int64_t n, Buffers& buf) {
  Chunk c;
  c.j = in.J.load(b, i0, n, buf.j);
  c.x = in.x.load(b, i0, n, buf.x);
  c.dx = in.dx.load(b, i0, n, buf.dx);
  c.f = in.F.load(b, i0, n, buf.f);
  c.fm = in.has_fm ? in.Fm.load(b, i0, n, buf.fm) : nullptr;
  return c;
}

// ---------------------------------------------------------------------------------------------
// Chunk kernels. Function multi-versioning: an AVX2 clone (8 lanes), chosen at load time on CPUs
// that have it, next to the baseline SSE2 version (the build has no -march). Each one makes a
// single pass over the chunk, fusing g (A14), e (A17) and the reduction or the output.
// Reductions use kLanes fp32 accumulators: element i of the chunk always goes to lane i % kLanes
// (chunks start at multiples of kChunk, so this is also the element's index in the sample mod
// kLanes), and the lanes are folded in order, so the result does not depend on the thread count
// or the schedule. No FMA is enabled in either clone, so both round every product and sum alike.
// ---------------------------------------------------------------------------------------------
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SCM_LOSS_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SCM_LOSS_CLONES
#endif

// Folds the lanes in order.
inline float fold_lanes(const float* acc) {
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

// sum_i g_i^2 (A14, A16) of one chunk. fm is F^- (F itself without F_minus).
SCM_LOSS_CLONES float chunk_g_sumsq(const float* __restrict fm, const float* __restrict dx,
                                    const float* __restrict x, const float* __restrict j, LossCoef k, int64_t n) {
  float acc[kLanes] = {0.f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float g = k.fm * fm[i + l] + k.dx * dx[i + l] + k.x * x[i + l] + k.j * j[i + l];
      acc[l] += g * g;
    }
  }
  for (int l = 0; i < n; ++i, ++l) {
    const float g = k.fm * fm[i] + k.dx * dx[i] + k.x * x[i] + k.j * j[i];
    acc[l] += g * g;
  }
  return fold_lanes(acc);
}

// sum_i e_i * v_i of one chunk with e_i = (F - F^-)_i - g_i * inv (A17), or e_i = -g_i * inv with F^- = F
// when fm is nullptr. v = nullptr means v = e (sum of squares).
SCM_LOSS_CLONES float chunk_e_dot(const float* __restrict f, const float* __restrict fm, const float* __restrict dx,
                                  const float* __restrict x, const float* __restrict j, LossCoef k, float inv,
                                  const float* __restrict v, int64_t n) {
  float acc[kLanes] = {0.f};
  int64_t i = 0;
#define SCM_LOSS_E_LOOP(E_EXPR, PROD)                                                          \
  for (; i + kLanes <= n; i += kLanes) {                                                         \
    for (int l = 0; l < kLanes; ++l) {                                                           \
      const int64_t m = i + l;                                                                   \
      const float e = E_EXPR;                                                                    \
      acc[l] += PROD;                                                                            \
    }                                                                                            \
  }                                                                                              \
  for (int l = 0; i < n; ++i, ++l) {                                                             \
    const int64_t m = i;                                                                         \
    const float e = E_EXPR;                                                                      \
    acc[l] += PROD;                                                                              \
  }
#define SCM_LOSS_G(FM) (k.fm * FM[m] + k.dx * dx[m] + k.x * x[m] + k.j * j[m])
  if (fm != nullptr) {
    if (v != nullptr) {
      SCM_LOSS_E_LOOP((f[m] - fm[m]) - SCM_LOSS_G(fm) * inv, e * v[m])
    } else {
      SCM_LOSS_E_LOOP((f[m] - fm[m]) - SCM_LOSS_G(fm) * inv, e * e)
    }
  } else {
    if (v != nullptr) {
      SCM_LOSS_E_LOOP(-SCM_LOSS_G(f) * inv, e * v[m])
    } else {
      SCM_LOSS_E_LOOP(-SCM_LOSS_G(f) * inv, e * e)
    }
  }
#undef SCM_LOSS_G
#undef SCM_LOSS_E_LOOP
  return fold_lanes(acc);
}

// out_i = e_i * scale (the backward, A17), e as in chunk_e_dot.
SCM_LOSS_CLONES void chunk_e_scaled(const float* __restrict f, const float* __restrict fm, const float* __restrict dx,
                                    const float* __restrict x, const float* __restrict j, LossCoef k, float inv,
                                    float scale, int64_t n, float* __restrict out) {
  if (fm != nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const float g = k.fm * fm[i] + k.dx * dx[i] + k.x * x[i] + k.j * j[i];
      out[i] = ((f[i] - fm[i]) - g * inv) * scale;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const float g = k.fm * f[i] + k.dx * dx[i] + k.x * x[i] + k.j * j[i];
      out[i] = (-g * inv) * scale;
    }
  }
}

// Per-sample coefficients of g (A14).
std::vector<LossCoef> sample_coefs(const Inputs& in, int64_t B) {
  std::vector<LossCoef> k(B);
  for (int64_t b = 0; b < B; ++b) k[b] = loss_coef(in.t[b], in.sigma_d, in.r);
  return k;
}

int64_t n_segments(int64_t D) { return (D + kSeg - 1) / kSeg; }

// Runs body(b, i0, n) over every (sample, chunk) of each (sample, segment) task in parallel;
// body returns the chunk's fp32 partial, summed per task into partial[b * nseg + s].
template <class Body>
void segment_reduce(int64_t B, int64_t D, std::vector<float>& partial, const Body& body) {
  const int64_t nseg = n_segments(D);
  partial.assign(B * nseg, 0.f);
  at::parallel_for(0, B * nseg, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nseg, s = task % nseg;
      const int64_t lo = s * kSeg, hi = std::min(D, lo + kSeg);
      float acc = 0.f;
      for (int64_t i0 = lo; i0 < hi; i0 += kChunk) acc += body(b, i0, std::min(kChunk, hi - i0));
      partial[task] = acc;
    }
  });
}

// Sum of sample b's partials, in segment order.
inline float sample_sum(const std::vector<float>& partial, int64_t b, int64_t nseg) {
  float s = 0.f;
  for (int64_t k = 0; k < nseg; ++k) s += partial[b * nseg + k];
  return s;
}

void check_float_dtype(const at::Tensor& x, const char* name) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, "scm_loss: ", name,
              " must be float32, float16, bfloat16 or float64, got ", dt);
}

void check_vec(const at::Tensor& x, const char* name, int64_t B) {
  TORCH_CHECK(x.device().is_cpu(), "scm_loss: ", name, " must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "scm_loss: ", name, " must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 1 && x.size(0) == B, "scm_loss: ", name, " must have shape (", B, "), got ", x.sizes());
}

void check_row_operand(const at::Tensor& x, const char* name, int64_t B, int64_t D) {
  check_rows(x, name, B, D);
  check_float_dtype(x, name);
}

Inputs make_inputs(const at::Tensor& F, const at::Tensor& J, const at::Tensor& x_t, const at::Tensor& dxt_dt,
                   const at::Tensor& t, const std::optional<at::Tensor>& F_minus, double sigma_d, double r, double c) {
  TORCH_CHECK(F.dim() == 2, "scm_loss: F must be a (B, D) view, got ", F.sizes());
  const int64_t B = F.size(0), D = F.size(1);
  TORCH_CHECK(B > 0 && D > 0, "scm_loss: F must not be empty, got ", F.sizes());
  check_row_operand(F, "F", B, D);
  check_row_operand(J, "J", B, D);
  check_row_operand(x_t, "x_t", B, D);
  check_row_operand(dxt_dt, "dxt_dt", B, D);
  check_vec(t, "t", B);
  Inputs in;
  in.F = Operand(F);
  in.J = Operand(J);
  in.x = Operand(x_t);
  in.dx = Operand(dxt_dt);
  in.has_fm = F_minus.has_value();
  if (in.has_fm) {
    check_row_operand(*F_minus, "F_minus", B, D);
    in.Fm = Operand(*F_minus);
  }
  in.t = Scalars(t);
  in.sigma_d = static_cast<float>(sigma_d);
  in.r = static_cast<float>(r);
  in.c = static_cast<float>(c);
  return in;
}

// ---------------------------------------------------------------------------------------------
// Forward: pass 1 ||g||^2, pass 2 ||F - F^- - g^||^2 (A14-A17).
// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> scm_loss_cpu(const at::Tensor& F, const at::Tensor& J,
                                                            const at::Tensor& x_t, const at::Tensor& dxt_dt,
                                                            const at::Tensor& t,
                                                            const std::optional<at::Tensor>& logvar,
                                                            const std::optional<at::Tensor>& F_minus,
                                                            double sigma_d, double r, double c) {
  const Inputs in = make_inputs(F, J, x_t, dxt_dt, t, F_minus, sigma_d, r, c);
  const int64_t B = F.size(0), D = F.size(1), nseg = n_segments(D);
  if (logvar.has_value()) check_vec(*logvar, "logvar", B);
  const auto opts = F.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({B}, opts), gnorm = at::empty({B}, opts), sqerr = at::empty({B}, opts);
  float* gn = gnorm.mutable_data_ptr<float>();

  const std::vector<LossCoef> coef = sample_coefs(in, B);
  std::vector<float> partial;
  // pass 1 (A14, A16)
  segment_reduce(B, D, partial, [&](int64_t b, int64_t i0, int64_t n) {
    Buffers buf;
    const Chunk c = load_chunk(in, b, i0, n, buf);
    return chunk_g_sumsq(c.fm != nullptr ? c.fm : c.f, c.dx, c.x, c.j, coef[b], n);
  });
  for (int64_t b = 0; b < B; ++b) gn[b] = std::sqrt(sample_sum(partial, b, nseg));
  // pass 2 (A16, A17)
  segment_reduce(B, D, partial, [&](int64_t b, int64_t i0, int64_t n) {
    Buffers buf;
    const Chunk c = load_chunk(in, b, i0, n, buf);
    return chunk_e_dot(c.f, c.fm, c.dx, c.x, c.j, coef[b], 1.f / (gn[b] + in.c), nullptr, n);
  });
  float* L = loss.mutable_data_ptr<float>();
  float* sq = sqerr.mutable_data_ptr<float>();
  const float inv_D = 1.f / static_cast<float>(D);
  const Scalars lv = logvar.has_value() ? Scalars(*logvar) : Scalars();
  for (int64_t b = 0; b < B; ++b) {
    sq[b] = sample_sum(partial, b, nseg);
    L[b] = logvar.has_value() ? std::exp(-lv[b]) * inv_D * sq[b] + lv[b] : sq[b] * inv_D;
  }
  return {loss, gnorm, sqerr};
}

// ---------------------------------------------------------------------------------------------
// Backward: dL/dF = grad * 2 w / D * e (A17), (B, D) contiguous in F's dtype.
// ---------------------------------------------------------------------------------------------
at::Tensor scm_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& F, const at::Tensor& J,
                                 const at::Tensor& x_t, const at::Tensor& dxt_dt, const at::Tensor& t,
                                 const std::optional<at::Tensor>& logvar, const std::optional<at::Tensor>& F_minus,
                                 const at::Tensor& gnorm, double sigma_d, double r, double c) {
  const Inputs in = make_inputs(F, J, x_t, dxt_dt, t, F_minus, sigma_d, r, c);
  const int64_t B = F.size(0), D = F.size(1), nseg = n_segments(D);
  check_vec(grad_loss, "grad_loss", B);
  check_vec(gnorm, "gnorm", B);
  if (logvar.has_value()) check_vec(*logvar, "logvar", B);
  at::Tensor dF = at::empty({B, D}, F.options());
  const Scalars grad(grad_loss), gn(gnorm);
  const Scalars lv = logvar.has_value() ? Scalars(*logvar) : Scalars();
  const bool has_lv = logvar.has_value();
  const float inv_D = 1.f / static_cast<float>(D);
  char* out = static_cast<char*>(dF.mutable_data_ptr());
  const int64_t es = dF.element_size();
  const at::ScalarType dt = dF.scalar_type();
  const bool out_f32 = dt == at::kFloat;
  at::parallel_for(0, B * nseg, 1, [&](int64_t begin, int64_t end) {
    Buffers buf;
    float e[kChunk];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nseg, s = task % nseg;
      const int64_t lo = s * kSeg, hi = std::min(D, lo + kSeg);
      const LossCoef k = loss_coef(in.t[b], in.sigma_d, in.r);
      const float inv = 1.f / (gn[b] + in.c);
      const float scale = 2.f * inv_D * grad[b] * (has_lv ? std::exp(-lv[b]) : 1.f);
      for (int64_t i0 = lo; i0 < hi; i0 += kChunk) {
        const int64_t n = std::min(kChunk, hi - i0);
        const Chunk c = load_chunk(in, b, i0, n, buf);
        char* o = out + (b * D + i0) * es;
        // fp32 output (dF is a fresh contiguous tensor): written in place
        float* dst = out_f32 ? reinterpret_cast<float*>(o) : e;
        chunk_e_scaled(c.f, c.fm, c.dx, c.x, c.j, k, inv, scale, n, dst);
        if (!out_f32) store_f32(e, n, dt, o);
      }
    }
  });
  return dF;
}

// ---------------------------------------------------------------------------------------------
// JVP: dot_b = sum_i e_i * Fdot_i (the caller forms Ldot).
// ---------------------------------------------------------------------------------------------
at::Tensor scm_loss_jvp_cpu(const at::Tensor& F_dot, const at::Tensor& F, const at::Tensor& J, const at::Tensor& x_t,
                            const at::Tensor& dxt_dt, const at::Tensor& t, const std::optional<at::Tensor>& F_minus,
                            const at::Tensor& gnorm, double sigma_d, double r, double c) {
  const Inputs in = make_inputs(F, J, x_t, dxt_dt, t, F_minus, sigma_d, r, c);
  const int64_t B = F.size(0), D = F.size(1), nseg = n_segments(D);
  check_row_operand(F_dot, "F_dot", B, D);
  check_vec(gnorm, "gnorm", B);
  const Operand fdot(F_dot);
  const Scalars gn(gnorm);
  const std::vector<LossCoef> coef = sample_coefs(in, B);
  std::vector<float> partial;
  segment_reduce(B, D, partial, [&](int64_t b, int64_t i0, int64_t n) {
    Buffers buf;
    float fd_buf[kChunk];
    const Chunk c = load_chunk(in, b, i0, n, buf);
    return chunk_e_dot(c.f, c.fm, c.dx, c.x, c.j, coef[b], 1.f / (gn[b] + in.c), fdot.load(b, i0, n, fd_buf), n);
  });
  at::Tensor dot = at::empty({B}, F.options().dtype(at::kFloat));
  float* out = dot.mutable_data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) out[b] = sample_sum(partial, b, nseg);
  return dot;
}

}  // namespace
}  // namespace scm::cpu

TORCH_LIBRARY_IMPL(scm, CPU, m) {
  m.impl("scm_loss", &scm::cpu::scm_loss_cpu);
  m.impl("scm_loss_backward", &scm::cpu::scm_loss_backward_cpu);
  m.impl("scm_loss_jvp", &scm::cpu::scm_loss_jvp_cpu);
}
