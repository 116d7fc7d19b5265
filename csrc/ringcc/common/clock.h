// Monotonic deadlines for every blocking wait.
#pragma once

#include <chrono>

namespace ringcc {

using Clock = std::chrono::steady_clock;

struct Deadline {
  Clock::time_point at;
  double seconds;  // the timeout it was made from, for error messages

  static Deadline after(double timeout_seconds) {
    auto d = std::chrono::duration_cast<Clock::duration>(
        std::chrono::duration<double>(timeout_seconds));
    return Deadline{Clock::now() + d, timeout_seconds};
  }
  bool expired() const { return Clock::now() >= at; }
  // Time left, clamped to [0, cap].
  std::chrono::nanoseconds remaining(std::chrono::nanoseconds cap) const {
    auto left = std::chrono::duration_cast<std::chrono::nanoseconds>(at - Clock::now());
    if (left.count() < 0) return std::chrono::nanoseconds(0);
    return left < cap ? left : cap;
  }
};

}  // namespace ringcc
