// TCP plumbing: listening, connecting with retries, the setup handshake, options.
#pragma once

#include <cstdint>
#include <string>

#include "ringcc/common/clock.h"

namespace ringcc::transport::tcp {

// "host:port", "[v6]:port" <-> parts. split_address bounds what it is given (addresses
// come from the rendezvous store): at most kMaxAddressBytes, a non-empty host and a
// decimal port in 1..65535; anything else throws std::invalid_argument naming it.
constexpr size_t kMaxAddressBytes = 300;
void split_address(const std::string& addr, std::string* host, int* port);
std::string join_address(const std::string& host, int port);

class Listener {
 public:
  // Binds `host` (numeric IPv4/IPv6; "" = all interfaces) on an ephemeral port.
  explicit Listener(const std::string& host, int backlog);
  ~Listener();
  Listener(const Listener&) = delete;
  Listener& operator=(const Listener&) = delete;
  const std::string& address() const { return address_; }  // "host:port" as peers dial it
  int fd() const { return fd_; }  // for callers that poll it themselves (the ps server)
  // Accepts one connection before the deadline; returns a blocking fd.
  int accept_one(const Deadline& deadline);
  void close_now();

 private:
  int fd_ = -1;
  std::string address_;
};

// Connects to addr, retrying refused/unreachable attempts until the deadline.
int connect_to(const std::string& addr, const Deadline& deadline, int peer_rank);

// Blocking exact I/O with a deadline (setup only; the data path never blocks).
void send_all(int fd, const void* data, size_t n, const Deadline& deadline, const char* what);
void recv_all(int fd, void* data, size_t n, const Deadline& deadline, const char* what);

// "host:port" of the other end of a connected socket, for log lines.
std::string peer_address(int fd);

// TCP_NODELAY, optional SO_SNDBUF/SO_RCVBUF (RINGCC_SOCKET_BUFFER_BYTES), then O_NONBLOCK.
void configure_data_socket(int fd);

}  // namespace ringcc::transport::tcp
