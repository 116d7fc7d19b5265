#include "ringcc/engine/work.h"

#include <chrono>

namespace ringcc {

bool Work::is_completed() {
  std::lock_guard<std::mutex> lock(mu_);
  return done_;
}

bool Work::wait(double timeout_seconds) {
  std::unique_lock<std::mutex> lock(mu_);
  if (timeout_seconds < 0) {
    cv_.wait(lock, [&] { return done_; });
  } else if (!cv_.wait_for(lock, std::chrono::duration<double>(timeout_seconds), [&] { return done_; })) {
    return false;
  }
  if (error_) std::rethrow_exception(error_);
  return true;
}

std::exception_ptr Work::error() {
  std::lock_guard<std::mutex> lock(mu_);
  return error_;
}

void Work::add_done_callback(std::function<void()> fn) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!done_) {
      callbacks_.push_back(std::move(fn));
      return;
    }
  }
  fn();
}

void Work::finish(std::exception_ptr error) {
  std::vector<std::function<void()>> callbacks;
  {
    std::lock_guard<std::mutex> lock(mu_);
    error_ = error;
    done_ = true;
    callbacks.swap(callbacks_);
  }
  cv_.notify_all();
  for (auto& fn : callbacks) fn();
}

}  // namespace ringcc
