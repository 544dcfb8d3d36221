// Operator schemas of the `scm` library (torch.ops.scm.*). The CPU implementations live in
// csrc/cpu/<op>.cpp, the CUDA ones in csrc/cuda/<op>.cu, the fake (meta) ones in Python
// (scm_kernels/<op>/function.py), so that torch.compile can trace every op.
//
// Conventions shared by all schemas:
//   * per-sample tensors are passed as 2-D (B, D) views whose inner stride is 1; the row stride
//     is free (0 for a tensor broadcast over the batch). scm_kernels._layout builds these views
//     without copies for contiguous, batch-sliced and channels_last inputs.
//   * per-sample scalars (times, logvar) are 1-D float32 tensors of length B (stride free).
//   * outputs and statistics are float32 unless stated otherwise.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A module with no methods: importing scm_kernels._C runs the static registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(scm, m) {
  // time_embedding (A10): t (B,) f32 -> (B, dim) f32. freqs (half,) f32: Fourier frequencies f_k
  // (omega_k = 2 pi f_k); None: positional frequencies from max_period.
  m.def("time_embedding(Tensor t, int dim, float max_period, float time_scale, Tensor? freqs) -> Tensor");
  // Tangent of the embedding for tangents t_dot (B,) and freqs_dot (half,), either may be None.
  m.def("time_embedding_jvp(Tensor t, Tensor? t_dot, int dim, float max_period, float time_scale, "
        "Tensor? freqs, Tensor? freqs_dot) -> Tensor");
  // Gradients (dt (B,), dfreqs (half,)) for the upstream gradient grad (B, dim);
  // dfreqs is an empty tensor unless need_dfreqs.
  m.def("time_embedding_backward(Tensor grad, Tensor t, int dim, float max_period, float time_scale, "
        "Tensor? freqs, bool need_dfreqs) -> (Tensor, Tensor)");

  // trigflow_step (A23): out = cx*x_t + cf*F + ce*eps per sample (see scm::trig_coef). Besides (B, D)
  // views it takes contiguous (B, ...) tensors of one shape (samples of numel / B elements); the
  // output has x_t's shape.
  // noise_mode: 0 denoise only (t_next unused), 1 renoise with `noise`, 2 renoise with Philox
  // normals keyed by `seed`, 3 renoise with zero noise. Output: x_t's dtype, or uint8 pixels.
  m.def("trigflow_step(Tensor x_t, Tensor F, Tensor t, Tensor? t_next, Tensor? noise, float sigma_d, "
        "int seed, int noise_mode, bool out_uint8) -> Tensor");
  // Gradients of trigflow_step w.r.t. x_t and F (each None unless asked), for upstream grad (B, D).
  m.def("trigflow_step_backward(Tensor grad, Tensor t, Tensor? t_next, float sigma_d, bool renoise, "
        "bool need_x, bool need_F, ScalarType x_dtype, ScalarType F_dtype) -> (Tensor?, Tensor?)");

  // scm_loss (A14-A17), one program per sample, two passes:
  //   returns (loss (B,), gnorm (B,) = ||g||_2, sqerr (B,) = ||F - F_minus - g/(||g||+c)||^2).
  m.def("scm_loss(Tensor F, Tensor J, Tensor x_t, Tensor dxt_dt, Tensor t, Tensor? logvar, "
        "Tensor? F_minus, float sigma_d, float r, float c) -> (Tensor, Tensor, Tensor)");
  // dL/dF (B, D) in F's dtype, for upstream grad_loss (B,) and the saved gnorm.
  m.def("scm_loss_backward(Tensor grad_loss, Tensor F, Tensor J, Tensor x_t, Tensor dxt_dt, Tensor t, "
        "Tensor? logvar, Tensor? F_minus, Tensor gnorm, float sigma_d, float r, float c) -> Tensor");
  // Per-sample sum((F - F_minus - g/(||g||+c)) * F_dot) (B,) f32, for the tangent F_dot.
  m.def("scm_loss_jvp(Tensor F_dot, Tensor F, Tensor J, Tensor x_t, Tensor dxt_dt, Tensor t, "
        "Tensor? F_minus, Tensor gnorm, float sigma_d, float r, float c) -> Tensor");

  // attention (A24-A27), flash-style, O(N) memory. q (B,Hq,Nq,D), k (B,Hkv,Nk,D), v (B,Hkv,Nk,Dv) of one
  // dtype, stride(-1) == 1, other strides free; Hq % Hkv == 0 (GQA: query head h reads kv head
  // h / (Hq/Hkv)). mask: None or an expanded (B,Hq,Nq,Nk) view, bool (true = attend) or float32
  // (additive). is_causal: key j visible to query i iff j <= i. Fully masked rows give 0, lse = +inf.
  // out/out_tangent: (B,Nq,Hq,Dv) memory viewed as (B,Hq,Nq,Dv); lse, mu: (B,Hq,Nq) float32 (float64 for
  // float64 inputs).
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, bool is_causal, float scale) "
        "-> (Tensor, Tensor)");
  // (A26) gradients (dq, dk, dv); dk, dv summed over the query heads of each kv head.
  m.def("attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask, "
        "bool is_causal, float scale) -> (Tensor, Tensor, Tensor)");
  // (A25) primal and tangent in one pass: (out, out_tangent, lse, mu = rowsum(P * S_dot)); a None
  // tangent is zero.
  m.def("attention_jvp(Tensor q, Tensor k, Tensor v, Tensor? tq, Tensor? tk, Tensor? tv, Tensor? mask, "
        "bool is_causal, float scale) -> (Tensor, Tensor, Tensor, Tensor)");
  // (A24) the tangent alone from the saved forward (out, lse): (out_tangent, mu = rowsum(P * S_dot)),
  // without recomputing the softmax or P V; a None tangent is zero. mu in lse's dtype.
  m.def("attention_jvp_tangent(Tensor q, Tensor k, Tensor v, Tensor? tq, Tensor? tk, Tensor? tv, Tensor out, "
        "Tensor lse, Tensor? mask, bool is_causal, float scale) -> (Tensor, Tensor)");
  // (A27) reverse mode through attention_jvp for upstream (grad_out, grad_out_tangent), either None:
  // (dq, dk, dv, dtq, dtk, dtv); dtq/dtk/dtv are None when the matching tangent is None.
  m.def("attention_jvp_bwd(Tensor? grad_out, Tensor? grad_out_tangent, Tensor q, Tensor k, Tensor v, "
        "Tensor? tq, Tensor? tk, Tensor? tv, Tensor out, Tensor out_tangent, Tensor lse, Tensor mu, "
        "Tensor? mask, bool is_causal, float scale) -> (Tensor, Tensor, Tensor, Tensor?, Tensor?, Tensor?)");

  // group_norm (A28-A30): y = act((GN(x) * weight + bias) * scale + shift). x (N, C, S) view (S = spatial
  // size), channels-first (stride(2) == 1, stride(1) == S) or channels-last (stride(1) == 1, stride(2) == C),
  // batch stride free; weight, bias (C,) and scale, shift (N, C) float32 with free strides, None = 1 / 0.
  // silu: SiLU activation. Returns (y packed in x's layout and dtype, mean (N, G), rstd (N, G)) float32.
  m.def("group_norm(Tensor x, Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift, int num_groups, "
        "float eps, bool silu) -> (Tensor, Tensor, Tensor)");
  // (A29) tangent y_dot (packed, x's layout) for the tangents of x (x's layout and dtype) and of the
  // float32 per-channel operands; a None tangent is zero.
  m.def("group_norm_jvp(Tensor x, Tensor? x_dot, Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift, "
        "Tensor? weight_dot, Tensor? bias_dot, Tensor? scale_dot, Tensor? shift_dot, Tensor mean, Tensor rstd, "
        "int num_groups, bool silu) -> Tensor");
  // (A30) (dx packed in x's layout, P1 = sum_spatial da * xhat (N, C), P2 = sum_spatial da (N, C)) with
  // da = grad_y * SiLU'(a); the caller forms dweight, dbias, dscale, dshift from P1, P2.
  m.def("group_norm_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift, "
        "Tensor mean, Tensor rstd, int num_groups, bool silu) -> (Tensor, Tensor, Tensor)");
  // pixel_norm (A11) over dim 1 of an (O, C, I) view: rows of C contiguous (I == 1, stride(1) == 1) or
  // stride(2) == 1. Returns (y packed (O, C, I) contiguous or rows, rstd (O, I) float32).
  m.def("pixel_norm(Tensor a, float eps) -> (Tensor, Tensor)");
  // Tangent of pixel_norm for the tangent a_dot (a's shape, dtype and layout).
  m.def("pixel_norm_jvp(Tensor a, Tensor a_dot, Tensor rstd) -> Tensor");
  // Gradient w.r.t. a for the upstream grad (a's shape, dtype and layout).
  m.def("pixel_norm_backward(Tensor grad, Tensor a, Tensor rstd) -> Tensor");
}
