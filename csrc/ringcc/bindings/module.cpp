// ringcc._C: the one private native module. It speaks raw pointers, byte counts and
// dtype codes; turning arrays and tensors into those is the Python layer's job.
// Every call that can block releases the GIL.
#include <pybind11/functional.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <atomic>
#include <mutex>
#include <vector>

#include "ringcc/common/error.h"
#include "ringcc/engine/communicator.h"
#include "ringcc/kernels/cpu/compress.h"
#include "ringcc/kernels/cpu/kernels.h"
#include "ringcc_config.h"

namespace py = pybind11;
using namespace ringcc;

void bind_ps(py::module_& m);  // ps_bindings.cpp
void bind_cuda(py::module_& m);  // cuda_bindings.cpp
void bind_auth(py::module_& m);  // auth_bindings.cpp
void bind_fuzz(py::module_& m);  // fuzz_bindings.cpp

namespace {

PyObject* g_error = nullptr;
PyObject* g_timeout = nullptr;
PyObject* g_peer = nullptr;
PyObject* g_mismatch = nullptr;
PyObject* g_aborted = nullptr;

PyObject* new_exception(py::module_& m, const char* name, py::tuple bases, const char* doc) {
  std::string qual = std::string("ringcc._C.") + name;
  PyObject* type = PyErr_NewExceptionWithDoc(qual.c_str(), doc, bases.ptr(), nullptr);
  if (!type) throw py::error_already_set();
  m.add_object(name, py::handle(type));
  return type;
}

void register_exceptions(py::module_& m) {
  g_error = new_exception(m, "Error", py::make_tuple(py::handle(PyExc_RuntimeError)),
                          "A communicator failed (base of all ringcc runtime errors).");
  py::handle err(g_error);
  g_timeout = new_exception(m, "TimeoutError", py::make_tuple(err, py::handle(PyExc_TimeoutError)),
                            "An operation did not complete before its timeout.");
  g_peer = new_exception(m, "PeerError", py::make_tuple(err),
                         "A peer died, closed its communicator or broke the protocol.");
  g_mismatch = new_exception(m, "MismatchError", py::make_tuple(err),
                             "Ranks called different operations (collective, dtype, count, op, root, ...).");
  g_aborted = new_exception(m, "AbortedError", py::make_tuple(err),
                            "The communicator was aborted and can no longer be used.");
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const TimeoutError& e) {
      PyErr_SetString(g_timeout, e.what());
    } catch (const PeerError& e) {
      PyErr_SetString(g_peer, e.what());
    } catch (const MismatchError& e) {
      PyErr_SetString(g_mismatch, e.what());
    } catch (const AbortedError& e) {
      PyErr_SetString(g_aborted, e.what());
    } catch (const Error& e) {
      PyErr_SetString(g_error, e.what());
    } catch (const DtypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    }
  });
}

kernels::SimdLevel parse_simd(const std::string& s) {
  if (s == "generic") return kernels::SimdLevel::kGeneric;
  if (s == "avx2") return kernels::SimdLevel::kAvx2;
  RINGCC_THROW(std::invalid_argument, "unknown SIMD level '", s, "' (generic, avx2)");
}

void* ptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

// Done-callbacks are Python callables run on a communicator's progress thread. That
// thread must not drop the last reference to one: the callable may hold the last
// reference to a process group, and with it to the very communicator whose thread this
// is, whose destructor cannot join its own thread. Released callables wait here and are
// freed by the next Python call into the module (submit, run, wait, close, abort).
std::mutex g_graveyard_mu;
std::vector<py::function*> g_graveyard;
std::atomic<bool> g_graveyard_used{false};

void bury(py::function* f) {
  std::lock_guard<std::mutex> lock(g_graveyard_mu);
  g_graveyard.push_back(f);
  g_graveyard_used.store(true, std::memory_order_release);
}

// Frees the buried callables; call from a Python thread (with or without the GIL),
// never from a progress thread.
void drain_graveyard() {
  if (!g_graveyard_used.load(std::memory_order_acquire)) return;
  std::vector<py::function*> dead;
  {
    std::lock_guard<std::mutex> lock(g_graveyard_mu);
    dead.swap(g_graveyard);
    g_graveyard_used.store(false, std::memory_order_relaxed);
  }
  py::gil_scoped_acquire gil;
  for (py::function* f : dead) delete f;
}

// The piece lists of _pack/_unpack, checked to line up.
std::vector<void*> piece_ptrs(const char* fn, const std::vector<uintptr_t>& ptrs,
                              const std::vector<size_t>& offsets, const std::vector<size_t>& bytes) {
  if (ptrs.size() != offsets.size() || ptrs.size() != bytes.size()) {
    RINGCC_THROW(std::invalid_argument, fn, ": ", ptrs.size(), " pointers, ", offsets.size(),
                 " offsets and ", bytes.size(), " byte counts (must be equal)");
  }
  std::vector<void*> out(ptrs.size());
  for (size_t i = 0; i < ptrs.size(); ++i) out[i] = ptr(ptrs[i]);
  return out;
}

// One queued operation from the flat argument list the Python layer passes
// positionally; `Queue` is Communicator::submit or Communicator::run.
template <std::shared_ptr<Work> (Communicator::*Queue)(OpDesc)>
std::shared_ptr<Work> queue_op(Communicator& c, Collective kind, DataType dtype, std::optional<ReduceOp> op,
                               int root, int peer, bool is_send, int64_t tag, uintptr_t in, size_t in_bytes,
                               uintptr_t out, size_t out_bytes, size_t count, std::vector<size_t> counts,
                               std::vector<size_t> recv_counts, double timeout, Algorithm algorithm,
                               size_t segment_bytes, Compression compression) {
  drain_graveyard();
  OpDesc d;
  d.kind = kind;
  d.dtype = dtype;
  d.has_op = op.has_value();
  if (op) d.op = *op;
  d.root = root;
  d.peer = peer;
  d.is_send = is_send;
  d.tag = tag;
  d.in = ptr(in);
  d.in_bytes = in_bytes;
  d.out = ptr(out);
  d.out_bytes = out_bytes;
  d.count = count;
  d.counts = std::move(counts);
  d.recv_counts = std::move(recv_counts);
  d.timeout_seconds = timeout;
  d.algorithm = algorithm;
  d.segment_bytes = segment_bytes;
  d.compression = compression;
  return (c.*Queue)(std::move(d));
}

#define RINGCC_OP_ARGS                                                                                  \
  py::arg("kind"), py::arg("dtype"), py::arg("op"), py::arg("root"), py::arg("peer"), py::arg("is_send"), \
      py::arg("tag"), py::arg("in_ptr"), py::arg("in_bytes"), py::arg("out_ptr"), py::arg("out_bytes"),    \
      py::arg("count"), py::arg("counts"), py::arg("recv_counts"), py::arg("timeout"),                     \
      py::arg("algorithm"), py::arg("segment_bytes"), py::arg("compression")

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ringcc native core (private; use the ringcc package)";
  register_exceptions(m);

  py::enum_<DataType>(m, "DataType")
      .value("float16", DataType::kFloat16)
      .value("bfloat16", DataType::kBFloat16)
      .value("float32", DataType::kFloat32)
      .value("float64", DataType::kFloat64)
      .value("int8", DataType::kInt8)
      .value("uint8", DataType::kUInt8)
      .value("int32", DataType::kInt32)
      .value("int64", DataType::kInt64)
      .value("bool", DataType::kBool);
  py::enum_<ReduceOp>(m, "ReduceOp")
      .value("sum", ReduceOp::kSum)
      .value("avg", ReduceOp::kAvg)
      .value("prod", ReduceOp::kProd)
      .value("min", ReduceOp::kMin)
      .value("max", ReduceOp::kMax)
      .value("band", ReduceOp::kBand)
      .value("bor", ReduceOp::kBor)
      .value("bxor", ReduceOp::kBxor);
  py::enum_<Collective>(m, "Collective")
      .value("allreduce", Collective::kAllreduce)
      .value("broadcast", Collective::kBroadcast)
      .value("allgather", Collective::kAllgather)
      .value("allgather_v", Collective::kAllgatherV)
      .value("reduce_scatter", Collective::kReduceScatter)
      .value("reduce", Collective::kReduce)
      .value("gather", Collective::kGather)
      .value("scatter", Collective::kScatter)
      .value("alltoall", Collective::kAlltoall)
      .value("alltoall_v", Collective::kAlltoallV)
      .value("barrier", Collective::kBarrier)
      .value("send_recv", Collective::kSendRecv);
  py::enum_<Algorithm>(m, "Algorithm")
      .value("auto", Algorithm::kAuto)
      .value("ring", Algorithm::kRing)
      .value("recursive_doubling", Algorithm::kRecursiveDoubling);
  py::enum_<Compression>(m, "Compression")
      .value("none", Compression::kNone)
      .value("fp16", Compression::kFp16)
      .value("bf16", Compression::kBf16);

  m.def("element_size", [](DataType t) { return element_size(t); });
  // Address, size and writability of a contiguous buffer-protocol object: the cheap way
  // to get a NumPy array's pointer (its __array_interface__ costs microseconds).
  m.def("buffer_info", [](py::handle obj) {
    Py_buffer view;
    if (PyObject_GetBuffer(obj.ptr(), &view, PyBUF_ANY_CONTIGUOUS) != 0) throw py::error_already_set();
    auto out = py::make_tuple(reinterpret_cast<uintptr_t>(view.buf), static_cast<size_t>(view.len), !view.readonly);
    PyBuffer_Release(&view);
    return out;
  });
  m.def("op_supported", &op_supported);

  py::class_<Work, std::shared_ptr<Work>>(m, "Work")
      .def("wait", [](Work& w, double timeout) {
        drain_graveyard();
        return w.wait(timeout);
      }, py::arg("timeout") = -1.0, py::call_guard<py::gil_scoped_release>())
      .def("is_completed", &Work::is_completed)
      .def_property_readonly("seq", &Work::seq)
      .def_property_readonly("description", &Work::description)
      .def("raise_if_error", [](Work& w) {
        if (auto e = w.error()) std::rethrow_exception(e);
      })
      .def("add_done_callback", [](Work& w, py::function fn) {
        // Freed later by a Python thread, whichever thread drops it last (see bury()).
        auto holder = std::shared_ptr<py::function>(new py::function(std::move(fn)), bury);
        w.add_done_callback([holder]() {
          py::gil_scoped_acquire gil;
          try {
            (*holder)();
          } catch (py::error_already_set& e) {
            e.discard_as_unraisable("ringcc work done-callback");
          }
        });
      });

  py::class_<Communicator, std::shared_ptr<Communicator>>(m, "Communicator")
      .def(py::init([](int rank, int size, const std::string& transport, const std::string& listen_host,
                       size_t shm_ring_bytes, int tcp_streams, size_t tcp_stripe_bytes, double timeout,
                       double spin_seconds, size_t segment_bytes, size_t small_message_bytes,
                       Algorithm algorithm, const std::string& host_id, double handshake_timeout) {
             CommOptions o;
             o.mesh.host_id = host_id;
             o.mesh.handshake_timeout = handshake_timeout;
             o.mesh.transport = transport;
             o.mesh.listen_host = listen_host;
             o.mesh.shm_ring_bytes = shm_ring_bytes;
             o.mesh.tcp_streams = tcp_streams;
             o.mesh.tcp_stripe_bytes = tcp_stripe_bytes;
             o.timeout_seconds = timeout;
             o.spin_seconds = spin_seconds;
             o.segment_bytes = segment_bytes;
             o.small_message_bytes = small_message_bytes;
             o.allreduce_algorithm = algorithm;
             return std::make_shared<Communicator>(rank, size, o);
           }),
           py::arg("rank"), py::arg("size"), py::arg("transport"), py::arg("listen_host"),
           py::arg("shm_ring_bytes"), py::arg("tcp_streams"), py::arg("tcp_stripe_bytes"), py::arg("timeout"),
           py::arg("spin_seconds"), py::arg("segment_bytes"), py::arg("small_message_bytes"),
           py::arg("algorithm"), py::arg("host_id") = "", py::arg("handshake_timeout") = 10.0)
      .def_property_readonly("rank", &Communicator::rank)
      .def_property_readonly("size", &Communicator::size)
      .def("local_info", &Communicator::local_info)
      .def("connect", &Communicator::connect, py::arg("infos"), py::arg("secret"),
           py::call_guard<py::gil_scoped_release>())
      .def("link_kind", &Communicator::link_kind)
      // submit: queue for the progress thread. run: the same for a caller about to
      // wait, executed inline (without the GIL) when the communicator is idle.
      .def("submit", &queue_op<&Communicator::submit>, RINGCC_OP_ARGS)
      .def("run", &queue_op<&Communicator::run>, RINGCC_OP_ARGS, py::call_guard<py::gil_scoped_release>())
      .def("close", [](Communicator& c) {
        drain_graveyard();
        c.close();
      }, py::call_guard<py::gil_scoped_release>())
      .def("abort", [](Communicator& c, const std::string& reason) {
        drain_graveyard();
        c.abort(reason);
      }, py::arg("reason"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("is_aborted", &Communicator::is_aborted)
      .def_property_readonly("abort_reason", &Communicator::abort_reason);

  m.def("build_info", []() {
    py::dict d;
    d["version"] = RINGCC_VERSION;
    d["simd_best"] = kernels::simd_level_name(kernels::best_simd_level());
    d["simd_active"] = kernels::simd_level_name(kernels::simd_level());
    d["simd_compiled"] = py::cast(std::vector<std::string>(RINGCC_SIMD_COMPILED));
    d["cuda"] = bool(RINGCC_WITH_CUDA);
    d["cuda_architectures"] = std::string(RINGCC_CUDA_ARCHITECTURES);
    d["transports"] = py::cast(std::vector<std::string>{"tcp", "shm"});
    d["compiler"] = RINGCC_COMPILER;
    d["build_type"] = RINGCC_BUILD_TYPE;
    d["host_identity"] = host_identity();
    return d;
  });

  // Test hooks: direct access to the kernels and their dispatch.
  m.def("_reduce", [](uintptr_t out, uintptr_t a, uintptr_t b, size_t count, DataType t, ReduceOp op) {
    kernels::reduce(ptr(out), ptr(a), ptr(b), count, t, op);
  });
  m.def("_divide", [](uintptr_t buf, size_t count, DataType t, double d) { kernels::divide(ptr(buf), count, t, d); });
  m.def("_convert", [](uintptr_t dst, DataType dt, uintptr_t src, DataType st, size_t count) {
    kernels::convert(ptr(dst), dt, ptr(src), st, count);
  });
  // Compression and bucketing kernels, wrapped with validation by ringcc.kernels.
  using gil_free = py::call_guard<py::gil_scoped_release>;
  m.def("_compressed_bytes", &kernels::compressed_bytes);
  m.def("_compress", [](uintptr_t wire, uintptr_t in, size_t count, DataType t, float prescale) {
    kernels::compress(ptr(wire), static_cast<const float*>(ptr(in)), count, t, prescale);
  }, gil_free());
  m.def("_decompress", [](uintptr_t out, uintptr_t wire, size_t count, DataType t, bool accumulate) {
    kernels::decompress(static_cast<float*>(ptr(out)), ptr(wire), count, t, accumulate);
  }, gil_free());
  m.def("_error_feedback", [](uintptr_t x, uintptr_t residual, size_t count, DataType t) {
    kernels::error_feedback(static_cast<float*>(ptr(x)), static_cast<float*>(ptr(residual)), count, t);
  }, gil_free());
  m.def("_round_trip", [](uintptr_t x, size_t count, DataType t) {
    kernels::round_trip(static_cast<float*>(ptr(x)), count, t);
  }, gil_free());
  // The lists are converted before the GIL is released (call_guard wraps only the body).
  m.def("_pack", [](uintptr_t flat, const std::vector<uintptr_t>& srcs, const std::vector<size_t>& offsets,
                    const std::vector<size_t>& bytes) {
    const std::vector<void*> p = piece_ptrs("pack", srcs, offsets, bytes);
    kernels::pack(ptr(flat), p.data(), offsets.data(), bytes.data(), p.size());
  }, gil_free());
  m.def("_unpack", [](uintptr_t flat, const std::vector<uintptr_t>& dsts, const std::vector<size_t>& offsets,
                      const std::vector<size_t>& bytes) {
    const std::vector<void*> p = piece_ptrs("unpack", dsts, offsets, bytes);
    kernels::unpack(p.data(), ptr(flat), offsets.data(), bytes.data(), p.size());
  }, gil_free());
  m.def("_set_simd_level", [](const std::string& s) { kernels::set_simd_level(parse_simd(s)); });
  m.def("_simd_level", []() { return std::string(kernels::simd_level_name(kernels::simd_level())); });
  bind_ps(m);
  bind_cuda(m);
  bind_auth(m);
  bind_fuzz(m);
}
