// Handle of one queued operation.
#pragma once

#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

namespace ringcc {

class Work {
 public:
  Work(uint64_t seq, std::string description)
      : seq_(seq), description_(std::move(description)) {}

  bool is_completed();
  // Blocks until completion or `timeout_seconds` (< 0: no limit). Returns false on
  // timeout (the operation keeps running); rethrows the operation's error.
  bool wait(double timeout_seconds);
  // The error, if the operation failed (nullptr otherwise or while running).
  std::exception_ptr error();
  uint64_t seq() const { return seq_; }
  const std::string& description() const { return description_; }
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
  const uint64_t seq_;
  const std::string description_;
};

}  // namespace ringcc
