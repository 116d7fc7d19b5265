#include "ringcc/transport/tcp/tcp_link.h"

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "ringcc/common/clock.h"
#include "ringcc/common/error.h"

namespace ringcc::transport::tcp {
namespace {
constexpr size_t kStagingBytes = 256 * 1024;
// Below this many staged bytes, peek() compacts and refills so that a frame header or a
// split element always becomes contiguous.
constexpr size_t kMinContiguous = 64;
}  // namespace

TcpLink::TcpLink(int self, int peer, std::vector<int> fds, size_t stripe_bytes)
    : Link(self, peer), fds_(std::move(fds)), stripe_(stripe_bytes), staging_(kStagingBytes) {
  RINGCC_ASSERT(!fds_.empty() && stripe_ > 0);
}

TcpLink::~TcpLink() {
  for (int fd : fds_) ::close(fd);
}

int TcpLink::poll_fd(bool for_write) const {
  return fds_[stream_for(for_write ? send_pos_ : recv_pos_)];
}

size_t TcpLink::write_some(const void* data, size_t n) {
  const char* p = static_cast<const char*>(data);
  size_t total = 0;
  while (total < n) {
    size_t want = std::min(n - total, stripe_left(send_pos_));
    ssize_t k = ::send(fds_[stream_for(send_pos_)], p + total, want, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (k < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      if (errno == EINTR) continue;
      RINGCC_THROW(PeerError, "rank ", self_, ": connection to rank ", peer_,
                   " lost while sending: ", detail::errno_string(errno),
                   " (the peer process probably exited or was killed)");
    }
    total += static_cast<size_t>(k);
    send_pos_ += static_cast<uint64_t>(k);
    if (static_cast<size_t>(k) < want) break;  // socket buffer full
  }
  return total;
}

size_t TcpLink::recv_stream(void* dst, size_t n) {
  if (eof_) return 0;
  size_t want = std::min(n, stripe_left(recv_pos_));
  for (;;) {
    ssize_t k = ::recv(fds_[stream_for(recv_pos_)], dst, want, MSG_DONTWAIT);
    if (k > 0) {
      recv_pos_ += static_cast<uint64_t>(k);
      return static_cast<size_t>(k);
    }
    if (k == 0) {
      eof_ = true;
      return 0;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
    if (errno == ECONNRESET) {
      eof_ = true;
      return 0;
    }
    RINGCC_THROW(PeerError, "rank ", self_, ": connection to rank ", peer_,
                 " failed while receiving: ", detail::errno_string(errno));
  }
}

size_t TcpLink::read_some(void* dst, size_t n) {
  char* out = static_cast<char*>(dst);
  size_t total = 0;
  if (stage_end_ > stage_begin_) {
    total = std::min(n, stage_end_ - stage_begin_);
    std::memcpy(out, staging_.data() + stage_begin_, total);
    stage_begin_ += total;
  }
  // Large payloads go straight from the socket into the destination: no extra copy.
  while (total < n) {
    size_t k = recv_stream(out + total, n - total);
    if (k == 0) break;
    total += k;
  }
  return total;
}

void TcpLink::fill_staging() {
  if (stage_begin_ == stage_end_) stage_begin_ = stage_end_ = 0;
  if (stage_end_ - stage_begin_ < kMinContiguous && stage_begin_ > 0) {
    std::memmove(staging_.data(), staging_.data() + stage_begin_, stage_end_ - stage_begin_);
    stage_end_ -= stage_begin_;
    stage_begin_ = 0;
  }
  while (stage_end_ < staging_.size()) {
    size_t k = recv_stream(staging_.data() + stage_end_, staging_.size() - stage_end_);
    if (k == 0) break;
    stage_end_ += k;
  }
}

size_t TcpLink::peek(const void** data) {
  if (stage_end_ - stage_begin_ < kMinContiguous) fill_staging();
  *data = staging_.data() + stage_begin_;
  return stage_end_ - stage_begin_;
}

void TcpLink::consume(size_t n) {
  RINGCC_ASSERT(n <= stage_end_ - stage_begin_);
  stage_begin_ += n;
}

void TcpLink::shutdown_write() {
  for (int fd : fds_) ::shutdown(fd, SHUT_WR);
}

void TcpLink::drain(const Deadline& deadline) noexcept {
  try {
    bool sending = false;
    for (;;) {
      const void* p;
      if (size_t n = peek(&p)) {
        consume(n);
        sending = true;
        continue;
      }
      if (eof_ || !sending || deadline.expired()) return;
      pollfd pfd{poll_fd(false), POLLIN, 0};
      sending = ::poll(&pfd, 1, 50) > 0;  // quiet for 50 ms: it has stopped sending
    }
  } catch (const std::exception&) {
    // A reset connection has nothing left to drain.
  }
}

}  // namespace ringcc::transport::tcp
