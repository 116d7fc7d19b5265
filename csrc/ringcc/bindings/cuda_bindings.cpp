// Private hooks onto the CUDA kernels (kernels/cuda/cuda_kernels.h), used by
// ringcc.kernels for tensors on a GPU and by the GPU tests. Pointers and the stream
// (cudaStream_t) arrive as integers; every call releases the GIL, enqueues and returns.
// In a build without CUDA only `_cuda_device_count` exists, and it returns 0.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "ringcc/common/dtype.h"
#include "ringcc/common/error.h"
#include "ringcc_config.h"
#if RINGCC_WITH_CUDA
#include "ringcc/kernels/cuda/cuda_kernels.h"
#endif

namespace py = pybind11;
using namespace ringcc;

void bind_cuda(py::module_& m) {
#if RINGCC_WITH_CUDA
  namespace K = kernels::cuda;
  using U = uintptr_t;
  auto p = [](U v) { return reinterpret_cast<void*>(v); };
  auto f = [](U v) { return reinterpret_cast<float*>(v); };
  py::register_exception<K::CudaError>(m, "CudaError", PyExc_RuntimeError);
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("_cuda_device_count", &K::device_count, nogil);
  m.def("_cuda_reduce", [p](U out, U a, U b, size_t n, DataType t, ReduceOp op, U s) {
    K::reduce(p(out), p(a), p(b), n, t, op, p(s));
  }, nogil);
  m.def("_cuda_divide", [p](U buf, size_t n, DataType t, double d, U s) { K::divide(p(buf), n, t, d, p(s)); }, nogil);
  m.def("_cuda_compress", [p, f](U wire, U in, size_t n, DataType t, float prescale, U s) {
    K::compress(p(wire), f(in), n, t, prescale, p(s));
  }, nogil);
  m.def("_cuda_decompress", [p, f](U out, U wire, size_t n, DataType t, bool acc, U s) {
    K::decompress(f(out), p(wire), n, t, acc, p(s));
  }, nogil);
  m.def("_cuda_error_feedback", [p, f](U x, U r, size_t n, DataType t, U s) {
    K::error_feedback(f(x), f(r), n, t, p(s));
  }, nogil);
  m.def("_cuda_round_trip", [p, f](U x, size_t n, DataType t, U s) { K::round_trip(f(x), n, t, p(s)); }, nogil);
  m.def("_cuda_decompress_add_compress", [p, f](U wire_out, U wire_in, U local, U sum_out, size_t n, DataType t,
                                                 U s) {
    K::decompress_add_compress(p(wire_out), p(wire_in), f(local), f(sum_out), n, t, p(s));
  }, nogil);
  m.def("_cuda_pack", [p](U flat, const std::vector<U>& srcs, const std::vector<size_t>& offsets,
                          const std::vector<size_t>& bytes, U s) {
    RINGCC_CHECK_ARG(srcs.size() == offsets.size() && srcs.size() == bytes.size(), "_cuda_pack: ", srcs.size(),
                     " pointers, ", offsets.size(), " offsets and ", bytes.size(), " byte counts (must be equal)");
    std::vector<const void*> ptrs(srcs.size());
    for (size_t i = 0; i < srcs.size(); ++i) ptrs[i] = p(srcs[i]);
    K::pack(p(flat), ptrs.data(), offsets.data(), bytes.data(), ptrs.size(), p(s));
  }, nogil);
  m.def("_cuda_unpack", [p](U flat, const std::vector<U>& dsts, const std::vector<size_t>& offsets,
                            const std::vector<size_t>& bytes, U s) {
    RINGCC_CHECK_ARG(dsts.size() == offsets.size() && dsts.size() == bytes.size(), "_cuda_unpack: ", dsts.size(),
                     " pointers, ", offsets.size(), " offsets and ", bytes.size(), " byte counts (must be equal)");
    std::vector<void*> ptrs(dsts.size());
    for (size_t i = 0; i < dsts.size(); ++i) ptrs[i] = p(dsts[i]);
    K::unpack(ptrs.data(), p(flat), offsets.data(), bytes.data(), ptrs.size(), p(s));
  }, nogil);
#else
  m.def("_cuda_device_count", [] { return 0; });
#endif
}

