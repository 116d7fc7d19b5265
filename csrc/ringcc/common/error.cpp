#include "ringcc/common/error.h"

#include <cstring>

namespace ringcc::detail {

std::string errno_string(int err) {
  char buf[256];
  // GNU strerror_r may return a static string instead of filling buf.
  const char* s = strerror_r(err, buf, sizeof(buf));
  return std::string(s) + " [errno " + std::to_string(err) + "]";
}

}  // namespace ringcc::detail
