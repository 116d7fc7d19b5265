// Handle of one queued operation.
#pragma once

#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include "ringcc/engine/protocol.h"

namespace ringcc {

class Work {
 public:
  explicit Work(const OpHeader& header) : header_(header) {}

  bool is_completed();
  // Blocks until completion or `timeout_seconds` (< 0: no limit). Returns false on
  // timeout (the operation keeps running); rethrows the operation's error.
  bool wait(double timeout_seconds);
  // The error, if the operation failed (nullptr otherwise or while running).
  std::exception_ptr error();
  uint64_t seq() const { return header_.seq; }
  // "allreduce(seq=3, dtype=float32, ...)"; built on demand, not on the hot path.
  std::string description() const { return describe(header_); }
  // Runs `fn` on the progress thread when the work completes (at once if it has).
  void add_done_callback(std::function<void()> fn);

  // Engine side.
  void finish(std::exception_ptr error);

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::exception_ptr error_;
  std::vector<std::function<void()>> callbacks_;
  const OpHeader header_;
};

}  // namespace ringcc
