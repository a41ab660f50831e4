// pybind11 module rationale_kernels._C: thin, torch-free. Tensors arrive as integer addresses + sizes;
// the Python layer (rationale_kernels/ops) has already validated devices, dtypes, shapes and strides.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "rationale_loss.h"
#include "sample.h"
#include "sequence_logprobs.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

template <typename P>
P ptr(std::uintptr_t addr) {
  return reinterpret_cast<P>(addr);
}

rk::RowLossArgs make_args(int64_t n, int64_t v, std::uintptr_t logits, int64_t logits_ld,
                          std::uintptr_t labels, std::uintptr_t weights, std::uintptr_t ref_logits,
                          int64_t ref_ld, std::uintptr_t ref_logprobs, int kl_mode, int64_t kl_vocab,
                          double kl_coef, double entropy_coef, int64_t ignore_index,
                          std::uintptr_t row_scale, std::uintptr_t grad, int64_t grad_ld,
                          std::uintptr_t terms, int num_threads) {
  rk::RowLossArgs a;
  a.n = n;
  a.v = v;
  a.logits = ptr<const void*>(logits);
  a.logits_ld = logits_ld;
  a.labels = ptr<const int64_t*>(labels);
  a.weights = ptr<const void*>(weights);
  a.ref_logits = ptr<const void*>(ref_logits);
  a.ref_ld = ref_ld;
  a.ref_logprobs = ptr<const void*>(ref_logprobs);
  a.kl_mode = kl_mode;
  a.kl_vocab = kl_vocab;
  a.kl_coef = kl_coef;
  a.entropy_coef = entropy_coef;
  a.ignore_index = ignore_index;
  a.row_scale = ptr<const void*>(row_scale);
  a.grad = ptr<void*>(grad);
  a.grad_ld = grad_ld;
  a.terms = ptr<void*>(terms);
  a.num_threads = num_threads;
  return a;
}

rk::TokenRowsArgs token_args(int64_t b, int64_t t, int64_t v, std::uintptr_t logits,
                             int64_t stride_b, int64_t stride_t, std::uintptr_t labels,
                             int64_t ignore_index, int num_threads) {
  rk::TokenRowsArgs a;
  a.b = b;
  a.t = t;
  a.v = v;
  a.logits = ptr<const void*>(logits);
  a.stride_b = stride_b;
  a.stride_t = stride_t;
  a.labels = ptr<const int64_t*>(labels);
  a.ignore_index = ignore_index;
  a.num_threads = num_threads;
  return a;
}

rk::SampleArgs make_sample_args(int64_t b, int64_t v, std::uintptr_t logits, int64_t logits_ld,
                                std::uintptr_t temperature, double temperature_s,
                                std::uintptr_t top_k, int64_t top_k_s, std::uintptr_t top_p,
                                double top_p_s, std::uintptr_t min_p, double min_p_s,
                                int64_t num_samples, uint64_t seed, std::uintptr_t ids,
                                std::uintptr_t logprobs, int num_threads) {
  rk::SampleArgs a;
  a.b = b;
  a.v = v;
  a.logits = ptr<const void*>(logits);
  a.logits_ld = logits_ld;
  a.temperature = ptr<const void*>(temperature);
  a.temperature_s = temperature_s;
  a.top_k = ptr<const int64_t*>(top_k);
  a.top_k_s = top_k_s;
  a.top_p = ptr<const void*>(top_p);
  a.top_p_s = top_p_s;
  a.min_p = ptr<const void*>(min_p);
  a.min_p_s = min_p_s;
  a.num_samples = num_samples;
  a.seed = seed;
  a.ids = ptr<int64_t*>(ids);
  a.logprobs = ptr<void*>(logprobs);
  a.num_threads = num_threads;
  return a;
}

#ifdef RK_WITH_CUDA
// Runs a CUDA entry point (a callable returning its error message or nullptr) without the GIL;
// a message becomes RuntimeError("<op> cuda: <message>").
template <typename F>
void call_cuda(const char* op, F&& launch) {
  const char* err = nullptr;
  {
    py::gil_scoped_release release;
    err = launch();
  }
  if (err != nullptr) throw std::runtime_error(std::string(op) + " cuda: " + err);
}
#endif

py::dict build_info() {
  py::dict d;
  d["cpu"] = true;
#ifdef _OPENMP
  d["openmp"] = true;
  d["openmp_version"] = static_cast<int>(_OPENMP);
#else
  d["openmp"] = false;
  d["openmp_version"] = py::none();
#endif
#ifdef RK_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = std::string(RK_CUDA_ARCHS);
  d["cuda_version"] = std::string(RK_CUDA_VERSION);
#else
  d["cuda"] = false;
  d["cuda_archs"] = std::string();
  d["cuda_version"] = py::none();
#endif
  d["compiler"] = std::string(RK_CXX_COMPILER);
  d["build_type"] = std::string(RK_BUILD_TYPE);
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "rationale-kernels native kernels (torch-free)";
  m.def("build_info", &build_info, "What this build of the native module contains.");
  m.def(
      "rationale_loss_rows_cpu",
      [](int dtype, int64_t n, int64_t v, std::uintptr_t logits, int64_t logits_ld,
         std::uintptr_t labels, std::uintptr_t weights, std::uintptr_t ref_logits, int64_t ref_ld,
         std::uintptr_t ref_logprobs, int kl_mode, int64_t kl_vocab, double kl_coef,
         double entropy_coef, int64_t ignore_index, std::uintptr_t row_scale, std::uintptr_t grad,
         int64_t grad_ld, std::uintptr_t terms, int num_threads) {
        const rk::RowLossArgs a =
            make_args(n, v, logits, logits_ld, labels, weights, ref_logits, ref_ld, ref_logprobs,
                      kl_mode, kl_vocab, kl_coef, entropy_coef, ignore_index, row_scale, grad,
                      grad_ld, terms, num_threads);
        py::gil_scoped_release release;
        rk::rationale_loss_rows_cpu(static_cast<rk::DType>(dtype), a);
      });
  m.def(
      "token_logprobs_fwd_cpu",
      [](int dtype, int64_t b, int64_t t, int64_t v, std::uintptr_t logits, int64_t stride_b,
         int64_t stride_t, std::uintptr_t labels, int64_t ignore_index, std::uintptr_t logp,
         std::uintptr_t lse, int num_threads) {
        const rk::TokenRowsArgs a =
            token_args(b, t, v, logits, stride_b, stride_t, labels, ignore_index, num_threads);
        py::gil_scoped_release release;
        rk::token_logprobs_fwd_cpu(static_cast<rk::DType>(dtype), a, ptr<void*>(logp),
                                   ptr<void*>(lse));
      });
  m.def(
      "token_logprobs_bwd_cpu",
      [](int dtype, int64_t b, int64_t t, int64_t v, std::uintptr_t logits, int64_t stride_b,
         int64_t stride_t, std::uintptr_t labels, int64_t ignore_index, std::uintptr_t lse,
         std::uintptr_t w, std::uintptr_t grad, int64_t grad_ld, int num_threads) {
        const rk::TokenRowsArgs a =
            token_args(b, t, v, logits, stride_b, stride_t, labels, ignore_index, num_threads);
        py::gil_scoped_release release;
        rk::token_logprobs_bwd_cpu(static_cast<rk::DType>(dtype), a, ptr<const void*>(lse),
                                   ptr<const void*>(w), ptr<void*>(grad), grad_ld);
      });
  m.def(
      "sample_rows_cpu",
      [](int dtype, int64_t b, int64_t v, std::uintptr_t logits, int64_t logits_ld,
         std::uintptr_t temperature, double temperature_s, std::uintptr_t top_k, int64_t top_k_s,
         std::uintptr_t top_p, double top_p_s, std::uintptr_t min_p, double min_p_s,
         int64_t num_samples, uint64_t seed, std::uintptr_t ids, std::uintptr_t logprobs,
         int num_threads) {
        const rk::SampleArgs a = make_sample_args(b, v, logits, logits_ld, temperature,
                                                  temperature_s, top_k, top_k_s, top_p, top_p_s,
                                                  min_p, min_p_s, num_samples, seed, ids, logprobs,
                                                  num_threads);
        py::gil_scoped_release release;
        rk::sample_rows_cpu(static_cast<rk::DType>(dtype), a);
      });
#ifdef RK_WITH_CUDA
  m.def(
      "rationale_loss_rows_cuda",
      [](int dtype, int64_t n, int64_t v, std::uintptr_t logits, int64_t logits_ld,
         std::uintptr_t labels, std::uintptr_t weights, std::uintptr_t ref_logits, int64_t ref_ld,
         std::uintptr_t ref_logprobs, int kl_mode, int64_t kl_vocab, double kl_coef,
         double entropy_coef, int64_t ignore_index, std::uintptr_t row_scale, std::uintptr_t grad,
         int64_t grad_ld, std::uintptr_t terms, std::uintptr_t stream) {
        const rk::RowLossArgs a =
            make_args(n, v, logits, logits_ld, labels, weights, ref_logits, ref_ld, ref_logprobs,
                      kl_mode, kl_vocab, kl_coef, entropy_coef, ignore_index, row_scale, grad,
                      grad_ld, terms, 0);
        call_cuda("rationale_loss", [&] {
          return rk::rationale_loss_rows_cuda(static_cast<rk::DType>(dtype), a,
                                              reinterpret_cast<void*>(stream));
        });
      });
  m.def(
      "token_logprobs_fwd_cuda",
      [](int dtype, int64_t b, int64_t t, int64_t v, std::uintptr_t logits, int64_t stride_b,
         int64_t stride_t, std::uintptr_t labels, int64_t ignore_index, std::uintptr_t logp,
         std::uintptr_t lse, std::uintptr_t stream) {
        const rk::TokenRowsArgs a =
            token_args(b, t, v, logits, stride_b, stride_t, labels, ignore_index, 0);
        call_cuda("token_logprobs_fwd", [&] {
          return rk::token_logprobs_fwd_cuda(static_cast<rk::DType>(dtype), a, ptr<void*>(logp),
                                             ptr<void*>(lse), reinterpret_cast<void*>(stream));
        });
      });
  m.def(
      "token_logprobs_bwd_cuda",
      [](int dtype, int64_t b, int64_t t, int64_t v, std::uintptr_t logits, int64_t stride_b,
         int64_t stride_t, std::uintptr_t labels, int64_t ignore_index, std::uintptr_t lse,
         std::uintptr_t w, std::uintptr_t grad, int64_t grad_ld, std::uintptr_t stream) {
        const rk::TokenRowsArgs a =
            token_args(b, t, v, logits, stride_b, stride_t, labels, ignore_index, 0);
        call_cuda("token_logprobs_bwd", [&] {
          return rk::token_logprobs_bwd_cuda(static_cast<rk::DType>(dtype), a,
                                             ptr<const void*>(lse), ptr<const void*>(w),
                                             ptr<void*>(grad), grad_ld,
                                             reinterpret_cast<void*>(stream));
        });
      });
  m.def(
      "sample_rows_cuda",
      [](int dtype, int64_t b, int64_t v, std::uintptr_t logits, int64_t logits_ld,
         std::uintptr_t temperature, double temperature_s, std::uintptr_t top_k, int64_t top_k_s,
         std::uintptr_t top_p, double top_p_s, std::uintptr_t min_p, double min_p_s,
         int64_t num_samples, uint64_t seed, std::uintptr_t ids, std::uintptr_t logprobs,
         std::uintptr_t stream) {
        const rk::SampleArgs a = make_sample_args(b, v, logits, logits_ld, temperature,
                                                  temperature_s, top_k, top_k_s, top_p, top_p_s,
                                                  min_p, min_p_s, num_samples, seed, ids, logprobs,
                                                  0);
        call_cuda("sample", [&] {
          return rk::sample_rows_cuda(static_cast<rk::DType>(dtype), a,
                                      reinterpret_cast<void*>(stream));
        });
      });
#endif
}
