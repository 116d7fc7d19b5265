// ringcc._C.ps*: the parameter server and its client. Like module.cpp, raw pointers
// in; python/ringcc/ps.py turns tensors into them. Every blocking call drops the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "ringcc/ps/ps_client.h"
#include "ringcc/ps/ps_server.h"

namespace py = pybind11;
using namespace ringcc;

namespace {

PyObject* g_stale = nullptr;

const float* cptr(uintptr_t p) { return reinterpret_cast<const float*>(p); }
float* mptr(uintptr_t p) { return reinterpret_cast<float*>(p); }

using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;

// Hands a vector to NumPy without copying: the array owns it through a capsule.
py::object to_numpy(std::vector<float>&& v) {
  auto* owned = new std::vector<float>(std::move(v));
  py::capsule free_it(owned, [](void* p) { delete static_cast<std::vector<float>*>(p); });
  return F32Array({owned->size()}, {sizeof(float)}, owned->data(), free_it);
}

std::vector<float> from_numpy(const F32Array& a) {
  if (a.ndim() != 1) throw std::invalid_argument("ps restore: key arrays must be 1-D");
  return std::vector<float>(a.data(), a.data() + a.size());
}

}  // namespace

void bind_ps(py::module_& m) {
  using gil_free = py::call_guard<py::gil_scoped_release>;
  std::string qual = "ringcc._C.StaleError";
  g_stale = PyErr_NewExceptionWithDoc(qual.c_str(),
                                      "An async push lagged the key by more than the staleness bound.",
                                      m.attr("Error").ptr(), nullptr);
  if (!g_stale) throw py::error_already_set();
  m.add_object("StaleError", py::handle(g_stale));
  // Tried before module.cpp's translator (pybind11 tries the newest first), so the
  // subclass is not reported as its base ringcc.Error.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const ps::StaleError& e) {
      PyErr_SetString(g_stale, e.what());
    }
  });

  py::enum_<ps::Mode>(m, "PsMode").value("sync", ps::Mode::kSync).value("async_", ps::Mode::kAsync);

  py::class_<ps::Server>(m, "PsServer")
      .def(py::init([](const std::string& listen_host, int num_workers, ps::Mode mode, const std::string& secret,
                       double timeout, float lr, float momentum, float weight_decay, uint64_t staleness,
                       const std::string& transport, const std::string& host_id, double handshake_timeout) {
             ps::ServerOptions o;
             o.listen_host = listen_host;
             o.num_workers = num_workers;
             o.mode = mode;
             o.secret = secret;
             o.handshake_timeout = handshake_timeout;
             o.timeout = timeout;
             o.lr = lr;
             o.momentum = momentum;
             o.weight_decay = weight_decay;
             o.staleness = staleness;
             o.transport = transport;
             o.host_id = host_id;
             return std::make_unique<ps::Server>(std::move(o));
           }),
           py::arg("listen_host"), py::arg("num_workers"), py::arg("mode"), py::arg("secret"), py::arg("timeout"),
           py::arg("lr"), py::arg("momentum"), py::arg("weight_decay"), py::arg("staleness"),
           py::arg("transport") = "auto", py::arg("host_id") = "", py::arg("handshake_timeout") = 10.0)
      .def("start", &ps::Server::start, gil_free())
      .def("stop", &ps::Server::stop, gil_free())
      .def("wait", &ps::Server::wait, py::arg("timeout") = -1.0, gil_free())
      .def_property_readonly("address", &ps::Server::address)
      .def_property_readonly("running", &ps::Server::running)
      .def_property_readonly("error", &ps::Server::error)
      // [(id, name, numel, version, values, momentum or None)], ordered by id.
      .def("snapshot",
           [](ps::Server& s) {
             std::vector<ps::KeyState> keys;
             {
               py::gil_scoped_release nogil;  // waits for the loop thread
               keys = s.snapshot();
             }
             py::list out;
             for (ps::KeyState& k : keys) {
               py::object mom = k.momentum.empty() ? py::object(py::none()) : to_numpy(std::move(k.momentum));
               out.append(py::make_tuple(k.id, py::bytes(k.name), k.numel, k.version, to_numpy(std::move(k.values)),
                                         mom));
             }
             return out;
           })
      .def("restore", [](ps::Server& s, const py::list& entries) {
        std::vector<ps::KeyState> keys;
        for (const py::handle& e : entries) {
          auto t = e.cast<py::tuple>();
          if (t.size() != 6) throw std::invalid_argument("ps restore: entries are (id, name, numel, version, values, momentum)");
          ps::KeyState k;
          k.id = t[0].cast<uint64_t>();
          k.name = t[1].cast<std::string>();
          k.numel = t[2].cast<uint64_t>();
          k.version = t[3].cast<uint64_t>();
          k.values = from_numpy(t[4].cast<F32Array>());
          if (!t[5].is_none()) k.momentum = from_numpy(t[5].cast<F32Array>());
          keys.push_back(std::move(k));
        }
        s.restore(std::move(keys));
      });

  py::class_<ps::Handle, std::shared_ptr<ps::Handle>>(m, "PsHandle")
      .def("wait", &ps::Handle::wait, py::arg("timeout") = -1.0, gil_free())
      .def("done", &ps::Handle::done);

  py::class_<ps::Client>(m, "PsClient")
      .def(py::init([](int rank, int num_workers, const std::string& secret, std::vector<std::string> servers,
                       double timeout, const std::string& transport, const std::string& host_id,
                       uint64_t shm_region_bytes) {
             ps::ClientOptions o;
             o.transport = transport;
             o.host_id = host_id;
             if (shm_region_bytes) o.shm_region_bytes = shm_region_bytes;
             o.rank = rank;
             o.num_workers = num_workers;
             o.secret = secret;
             o.servers = std::move(servers);
             o.timeout = timeout;
             py::gil_scoped_release nogil;  // connecting blocks until every server answers
             return std::make_unique<ps::Client>(std::move(o));
           }),
           py::arg("rank"), py::arg("num_workers"), py::arg("secret"), py::arg("servers"), py::arg("timeout"),
           py::arg("transport") = "auto", py::arg("host_id") = "", py::arg("shm_region_bytes") = 0)
      .def_property_readonly("num_servers", &ps::Client::num_servers)
      // {"transport": "shm" | "tcp", "shm_payloads": n, "tcp_payloads": n} of one connection.
      .def("stats", [](const ps::Client& c, int server) {
             ps::LinkStats s = c.stats(server);
             py::dict d;
             d["transport"] = s.shm ? "shm" : "tcp";
             d["shm_payloads"] = s.shm_payloads;
             d["tcp_payloads"] = s.tcp_payloads;
             return d;
           })
      .def("mode", &ps::Client::mode)
      .def("register_key", &ps::Client::register_key, py::arg("server"), py::arg("key"), py::arg("name"),
           py::arg("numel"), py::arg("dtype") = DataType::kFloat32)
      .def("init", [](ps::Client& c, int server, uint64_t key, uintptr_t values, uint64_t numel) {
             return c.init(server, key, cptr(values), numel);
           })
      .def("push_pull", [](ps::Client& c, int server, uint64_t key, uintptr_t grad, uintptr_t out, uint64_t numel,
                           Compression wire) { return c.push_pull(server, key, cptr(grad), mptr(out), numel, wire); })
      .def("pull", [](ps::Client& c, int server, uint64_t key, uintptr_t out, uint64_t numel) {
             return c.pull(server, key, mptr(out), numel);
           })
      .def("shutdown", &ps::Client::shutdown)
      .def("close", &ps::Client::close, gil_free());
}
