// Test hooks for the authentication primitives (common/hmac.h): the tests check them
// against Python's hashlib and hmac. Private (underscored); not part of the API.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "ringcc/common/hmac.h"

namespace py = pybind11;

namespace {

py::bytes digest_bytes(const ringcc::auth::Digest& d) {
  return py::bytes(reinterpret_cast<const char*>(d.data()), d.size());
}

}  // namespace

void bind_auth(py::module_& m) {
  m.def(
      "_auth_sha256", [](const py::bytes& data) {
        std::string s = data;
        return digest_bytes(ringcc::auth::sha256(s.data(), s.size()));
      },
      py::arg("data"), "SHA-256 of `data` (test hook).");
  m.def(
      "_auth_sha256_chunks", [](const std::vector<std::string>& chunks) {
        ringcc::auth::Sha256 h;
        for (const std::string& c : chunks) h.update(c.data(), c.size());
        return digest_bytes(h.finish());
      },
      py::arg("chunks"), "SHA-256 of the concatenation, fed chunk by chunk (test hook).");
  m.def(
      "_auth_hmac_sha256", [](const py::bytes& key, const py::bytes& data) {
        std::string k = key, d = data;
        return digest_bytes(ringcc::auth::hmac_sha256(k.data(), k.size(), d.data(), d.size()));
      },
      py::arg("key"), py::arg("data"), "HMAC-SHA256 (test hook).");
  m.def(
      "_auth_constant_time_equal", [](const py::bytes& a, const py::bytes& b) {
        std::string x = a, y = b;
        return x.size() == y.size() && ringcc::auth::constant_time_equal(x.data(), y.data(), x.size());
      },
      py::arg("a"), py::arg("b"), "Byte-string equality in constant time (test hook).");
  m.def(
      "_auth_random", [](size_t n) {
        std::string out(n, '\0');
        ringcc::auth::secure_random(out.data(), n);
        return py::bytes(out);
      },
      py::arg("n"), "n bytes from the kernel's CSPRNG (test hook).");
}
