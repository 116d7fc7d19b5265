// One family of errors and check macros for the whole native core.
//
// Python sees: std::invalid_argument -> ValueError, DtypeError -> TypeError, and the
// ringcc.Error subclasses below under the same names (see bindings/module.cpp).
#pragma once

#include <cerrno>
#include <sstream>
#include <stdexcept>
#include <string>

namespace ringcc {

// Base of every runtime failure of a communicator (not of bad arguments).
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
// An operation did not finish before its deadline.
class TimeoutError : public Error {
 public:
  using Error::Error;
};
// A peer died, closed its communicator, or broke the protocol.
class PeerError : public Error {
 public:
  using Error::Error;
};
// Ranks called different operations (kind, dtype, count, op, root, ...).
class MismatchError : public Error {
 public:
  using Error::Error;
};
// The communicator was aborted (by abort() or an earlier error) and cannot be used.
class AbortedError : public Error {
 public:
  using Error::Error;
};
// A dtype or dtype/op combination the operation does not support.
class DtypeError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
std::string errno_string(int err);
}  // namespace detail

}  // namespace ringcc

#define RINGCC_THROW(ExcType, ...) throw ExcType(::ringcc::detail::concat(__VA_ARGS__))

// Argument validation: throws std::invalid_argument (Python ValueError).
#define RINGCC_CHECK_ARG(cond, ...)                               \
  do {                                                            \
    if (!(cond)) RINGCC_THROW(std::invalid_argument, __VA_ARGS__); \
  } while (0)

// Internal invariant: a failure here is a ringcc bug, reported with its location.
#define RINGCC_ASSERT(cond)                                                              \
  do {                                                                                   \
    if (!(cond))                                                                         \
      RINGCC_THROW(::ringcc::Error, "ringcc internal error: ", #cond, " at ", __FILE__, ":", \
                   __LINE__);                                                            \
  } while (0)

// System call returning -1 on failure; retried on EINTR, otherwise throws ringcc::Error
// naming the call, the context and errno.
#define RINGCC_SYSCHECK(expr, ...)                                                      \
  ([&]() {                                                                              \
    for (;;) {                                                                          \
      auto rc_ = (expr);                                                                \
      if (rc_ != -1) return rc_;                                                        \
      if (errno == EINTR) continue;                                                     \
      RINGCC_THROW(::ringcc::Error, #expr, " failed: ", ::ringcc::detail::errno_string(errno), \
                   " (", __VA_ARGS__, ")");                                             \
    }                                                                                   \
  }())
