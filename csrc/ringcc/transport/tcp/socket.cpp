#include "ringcc/transport/tcp/socket.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <thread>

#include "ringcc/common/error.h"
#include "ringcc/engine/protocol.h"

namespace ringcc::transport::tcp {
namespace {

int poll_ms(const Deadline& d) {
  auto left = d.remaining(std::chrono::milliseconds(100));
  return static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(left).count()) + 1;
}

void wait_fd(int fd, short events, const Deadline& deadline, const char* what) {
  for (;;) {
    if (deadline.expired())
      RINGCC_THROW(TimeoutError, "timed out after ", deadline.seconds, " s during ", what);
    pollfd p{fd, events, 0};
    int rc = poll(&p, 1, poll_ms(deadline));
    if (rc > 0) return;
    if (rc < 0 && errno != EINTR) RINGCC_THROW(Error, "poll failed during ", what, ": ", detail::errno_string(errno));
  }
}

}  // namespace

void split_address(const std::string& addr, std::string* host, int* port) {
  auto shown = [&] { return peer_text(addr.substr(0, 80)) + (addr.size() > 80 ? "..." : ""); };
  RINGCC_CHECK_ARG(addr.size() <= kMaxAddressBytes, "address of ", addr.size(), " bytes (at most ",
                   kMaxAddressBytes, "): '", shown(), "'");
  auto colon = addr.rfind(':');
  RINGCC_CHECK_ARG(colon != std::string::npos && colon > 0 && colon + 1 < addr.size(), "malformed address '",
                   shown(), "' (expected host:port)");
  std::string h = addr.substr(0, colon);
  if (h.front() == '[') {
    RINGCC_CHECK_ARG(h.size() > 2 && h.back() == ']', "malformed address '", shown(), "' (expected [v6]:port)");
    h = h.substr(1, h.size() - 2);
  }
  const std::string p = addr.substr(colon + 1);
  uint64_t value = 0;
  RINGCC_CHECK_ARG(p.size() <= 5 && parse_decimal(p, 1, 65535, &value), "port '", peer_text(p.substr(0, 20)),
                   "' of address '", shown(), "' is not a number in 1..65535");
  *host = h;
  *port = static_cast<int>(value);
}

std::string join_address(const std::string& host, int port) {
  if (host.find(':') != std::string::npos) return "[" + host + "]:" + std::to_string(port);
  return host + ":" + std::to_string(port);
}

Listener::Listener(const std::string& host, int backlog) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICHOST;
  addrinfo* res = nullptr;
  int rc = getaddrinfo(host.empty() ? nullptr : host.c_str(), "0", &hints, &res);
  if (rc != 0)
    RINGCC_THROW(std::invalid_argument, "cannot listen on '", host, "': ", gai_strerror(rc),
                 " (RINGCC_SOCKET_IFNAME / listen address must be a numeric IP)");
  fd_ = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd_ < 0) {
    freeaddrinfo(res);
    RINGCC_THROW(Error, "socket() failed: ", detail::errno_string(errno));
  }
  int one = 1;
  setsockopt(fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (bind(fd_, res->ai_addr, res->ai_addrlen) != 0) {
    int err = errno;
    freeaddrinfo(res);
    close_now();
    RINGCC_THROW(Error, "cannot bind a listening socket to ", host, ": ", detail::errno_string(err));
  }
  freeaddrinfo(res);
  RINGCC_SYSCHECK(listen(fd_, backlog), "listen on ", host);
  sockaddr_storage ss{};
  socklen_t len = sizeof(ss);
  RINGCC_SYSCHECK(getsockname(fd_, reinterpret_cast<sockaddr*>(&ss), &len), "getsockname");
  char buf[INET6_ADDRSTRLEN] = {0};
  int port = 0;
  if (ss.ss_family == AF_INET) {
    auto* a = reinterpret_cast<sockaddr_in*>(&ss);
    inet_ntop(AF_INET, &a->sin_addr, buf, sizeof(buf));
    port = ntohs(a->sin_port);
  } else {
    auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
    inet_ntop(AF_INET6, &a->sin6_addr, buf, sizeof(buf));
    port = ntohs(a->sin6_port);
  }
  address_ = join_address(buf, port);
}

Listener::~Listener() { close_now(); }

void Listener::close_now() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

int Listener::accept_one(const Deadline& deadline) {
  wait_fd(fd_, POLLIN, deadline, "accepting connections from peers");
  int fd = RINGCC_SYSCHECK(accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC), "accept");
  return fd;
}

int connect_to(const std::string& addr, const Deadline& deadline, int peer_rank) {
  std::string host;
  int port = 0;
  try {
    split_address(addr, &host, &port);
  } catch (const std::invalid_argument& e) {
    RINGCC_THROW(PeerError, "bad address of rank ", peer_rank, ": ", e.what());
  }
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  std::string port_s = std::to_string(port);
  int rc = getaddrinfo(host.c_str(), port_s.c_str(), &hints, &res);
  if (rc != 0) RINGCC_THROW(PeerError, "bad address '", addr, "' of rank ", peer_rank, ": ", gai_strerror(rc));
  int backoff_ms = 1;
  int last_err = 0;
  for (;;) {
    int fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
      freeaddrinfo(res);
      RINGCC_THROW(Error, "socket() failed: ", detail::errno_string(errno));
    }
    if (::connect(fd, res->ai_addr, res->ai_addrlen) == 0) {
      freeaddrinfo(res);
      return fd;
    }
    last_err = errno;
    ::close(fd);
    if (deadline.expired()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(backoff_ms));  // retry back-off, not synchronisation
    backoff_ms = std::min(backoff_ms * 2, 100);
  }
  freeaddrinfo(res);
  RINGCC_THROW(TimeoutError, "could not connect to rank ", peer_rank, " at ", addr, " within ",
               deadline.seconds, " s: ", detail::errno_string(last_err));
}

void send_all(int fd, const void* data, size_t n, const Deadline& deadline, const char* what) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t k = ::send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (k > 0) {
      p += k;
      n -= static_cast<size_t>(k);
    } else if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
      wait_fd(fd, POLLOUT, deadline, what);
    } else {
      RINGCC_THROW(PeerError, "connection lost during ", what, ": ", detail::errno_string(errno));
    }
  }
}

void recv_all(int fd, void* data, size_t n, const Deadline& deadline, const char* what) {
  char* p = static_cast<char*>(data);
  while (n > 0) {
    ssize_t k = ::recv(fd, p, n, MSG_DONTWAIT);
    if (k > 0) {
      p += k;
      n -= static_cast<size_t>(k);
    } else if (k == 0) {
      RINGCC_THROW(PeerError, "connection closed by the peer during ", what);
    } else if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
      wait_fd(fd, POLLIN, deadline, what);
    } else {
      RINGCC_THROW(PeerError, "connection lost during ", what, ": ", detail::errno_string(errno));
    }
  }
}

std::string peer_address(int fd) {
  sockaddr_storage ss{};
  socklen_t len = sizeof(ss);
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return "an unknown address";
  char host[INET6_ADDRSTRLEN] = {0};
  int port = 0;
  if (ss.ss_family == AF_INET) {
    auto* a = reinterpret_cast<sockaddr_in*>(&ss);
    inet_ntop(AF_INET, &a->sin_addr, host, sizeof(host));
    port = ntohs(a->sin_port);
  } else if (ss.ss_family == AF_INET6) {
    auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
    inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof(host));
    port = ntohs(a->sin6_port);
  } else {
    return "a non-IP address";
  }
  return join_address(host, port);
}

void configure_data_socket(int fd) {
  int one = 1;
  // Latency of small frames matters more than packet count: no Nagle delay.
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  // Linux auto-tunes socket buffers up to net.ipv4.tcp_{r,w}mem[2] (MBs); a fixed
  // SO_*BUF disables that and is capped by net.core.{r,w}mem_max (often 208 KiB), so
  // it is only set when asked for.
  if (const char* env = std::getenv("RINGCC_SOCKET_BUFFER_BYTES")) {
    int bytes = std::atoi(env);
    if (bytes > 0) {
      setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof(bytes));
      setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof(bytes));
    }
  }
  int flags = fcntl(fd, F_GETFL, 0);
  fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

}  // namespace ringcc::transport::tcp
