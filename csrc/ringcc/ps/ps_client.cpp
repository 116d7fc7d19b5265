#include "ringcc/ps/ps_client.h"

#include <sys/socket.h>
#include <unistd.h>

#include <cstring>

#include "ringcc/common/clock.h"
#include "ringcc/kernels/cpu/compress.h"
#include "ringcc/transport/tcp/socket.h"

namespace ringcc::ps {

namespace tcp = transport::tcp;

bool Handle::wait(double timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  if (timeout < 0) {
    cv_.wait(lock, [&] { return done_; });
  } else if (!cv_.wait_for(lock, std::chrono::duration<double>(timeout), [&] { return done_; })) {
    return false;
  }
  if (err_) std::rethrow_exception(err_);
  return true;
}

bool Handle::done() const {
  std::lock_guard<std::mutex> lock(mu_);
  return done_;
}

void Handle::finish(std::exception_ptr err) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    err_ = std::move(err);
    done_ = true;
  }
  cv_.notify_all();
}

namespace {

// An ERROR reply as the exception type its code stands for.
[[noreturn]] void raise_server_error(const std::string& where, ErrorCode code, const std::string& text) {
  std::string msg = where + ": " + text;
  switch (code) {
    case ErrorCode::kBadRequest:
    case ErrorCode::kUnknownKey: throw std::invalid_argument(msg);
    case ErrorCode::kBadDtype: throw DtypeError(msg);
    case ErrorCode::kAuth:
    case ErrorCode::kProtocol: throw PeerError(msg);
    case ErrorCode::kStale: throw StaleError(msg);
    case ErrorCode::kTimeout: throw TimeoutError(msg);
    default: throw Error(msg);
  }
}

}  // namespace

Client::Client(ClientOptions opts) : opts_(std::move(opts)) {
  RINGCC_CHECK_ARG(opts_.num_workers >= 1 && opts_.rank >= 0 && opts_.rank < opts_.num_workers,
                   "ps client: rank ", opts_.rank, " out of range for ", opts_.num_workers, " workers");
  RINGCC_CHECK_ARG(!opts_.servers.empty(), "ps client: no server addresses");
  RINGCC_CHECK_ARG(opts_.timeout > 0, "ps client: timeout must be positive");
  RINGCC_CHECK_ARG(opts_.token.size() <= kMaxTokenBytes, "ps client: job token longer than ", kMaxTokenBytes);
  for (size_t i = 0; i < opts_.servers.size(); ++i) {
    auto l = std::make_unique<Link>();
    l->index = static_cast<int>(i);
    l->address = opts_.servers[i];
    links_.push_back(std::move(l));
  }
  for (auto& l : links_) {
    Link* p = l.get();
    p->thread = std::thread([this, p] { run(*p); });
  }
  // Connect and say HELLO to every server in parallel.
  std::vector<std::shared_ptr<Handle>> hellos;
  for (size_t i = 0; i < links_.size(); ++i) {
    Request r;
    r.type = MsgType::kHello;
    hellos.push_back(submit(static_cast<int>(i), std::move(r)));
  }
  try {
    for (auto& h : hellos) h->wait(-1);
  } catch (...) {
    close();
    throw;
  }
}

Client::~Client() { close(); }

Mode Client::mode(int server) const {
  RINGCC_CHECK_ARG(server >= 0 && server < num_servers(), "ps client: server ", server, " out of range");
  return links_[server]->mode;
}

std::shared_ptr<Handle> Client::submit(int server, Request r) {
  RINGCC_CHECK_ARG(server >= 0 && server < num_servers(), "ps client: server ", server, " out of range [0, ",
                   num_servers(), ")");
  Link& l = *links_[server];
  r.handle = std::make_shared<Handle>();
  auto h = r.handle;
  {
    std::lock_guard<std::mutex> lock(l.mu);
    if (l.closing) RINGCC_THROW(AbortedError, "ps client is closed");
    l.queue.push_back(std::move(r));
  }
  l.cv.notify_one();
  return h;
}

std::shared_ptr<Handle> Client::register_key(int server, uint64_t key, const std::string& name, uint64_t numel,
                                             DataType dtype) {
  RINGCC_CHECK_ARG(name.size() <= kMaxNameBytes, "ps: key name longer than ", kMaxNameBytes, " bytes");
  Request r;
  r.type = MsgType::kRegister;
  r.key = key;
  r.name = name;
  r.numel = numel;
  r.dtype = dtype;
  return submit(server, std::move(r));
}

std::shared_ptr<Handle> Client::init(int server, uint64_t key, const float* values, uint64_t numel) {
  Request r;
  r.type = MsgType::kInit;
  r.key = key;
  r.numel = numel;
  r.in = values;
  return submit(server, std::move(r));
}

std::shared_ptr<Handle> Client::push_pull(int server, uint64_t key, const float* grad, float* out, uint64_t numel,
                                          Compression wire) {
  Request r;
  r.type = MsgType::kPushPull;
  r.key = key;
  r.numel = numel;
  r.wire = wire;
  r.in = grad;
  r.out = out;
  return submit(server, std::move(r));
}

std::shared_ptr<Handle> Client::pull(int server, uint64_t key, float* out, uint64_t numel) {
  Request r;
  r.type = MsgType::kPull;
  r.key = key;
  r.numel = numel;
  r.out = out;
  return submit(server, std::move(r));
}

std::shared_ptr<Handle> Client::shutdown(int server) {
  Request r;
  r.type = MsgType::kShutdown;
  return submit(server, std::move(r));
}

void Client::close() {
  for (auto& l : links_) {
    std::lock_guard<std::mutex> lock(l->mu);
    l->closing = true;
    if (l->fd >= 0) ::shutdown(l->fd, SHUT_RDWR);  // wakes a thread blocked on a reply
  }
  for (auto& l : links_) {
    l->cv.notify_all();
    if (l->thread.joinable()) l->thread.join();
    if (l->fd >= 0) ::close(l->fd);
    l->fd = -1;
  }
}

void Client::run(Link& l) {
  for (;;) {
    Request r;
    {
      std::unique_lock<std::mutex> lock(l.mu);
      l.cv.wait(lock, [&] { return l.closing || !l.queue.empty(); });
      if (l.queue.empty()) return;
      r = std::move(l.queue.front());
      l.queue.pop_front();
    }
    try {
      if (l.closing) RINGCC_THROW(AbortedError, "ps client closed before ", msg_name(r.type), " was sent");
      if (!l.broken.empty())
        RINGCC_THROW(PeerError, "parameter server ", l.index, " at ", l.address, ": connection unusable: ", l.broken);
      execute(l, r);
      r.handle->finish(nullptr);
    } catch (const std::exception& e) {
      r.handle->finish(std::current_exception());
    }
  }
}

void Client::execute(Link& l, Request& r) {
  const std::string where = detail::concat("parameter server ", l.index, " at ", l.address);
  const Deadline deadline = Deadline::after(opts_.timeout);
  // Any transport failure leaves the stream at an unknown point: the link is done. A
  // socket error says nothing about which server went away, so the text gains `where`.
  auto named = [&](const char* what) {
    std::string s = what;
    return s.find(where) != std::string::npos ? s : where + ": " + s;
  };
  auto io = [&](auto&& fn) {
    try {
      fn();
    } catch (const PeerError& e) {
      l.broken = e.what();
      throw PeerError(named(e.what()));
    } catch (const TimeoutError& e) {
      l.broken = e.what();
      throw TimeoutError(named(e.what()));
    } catch (const std::exception& e) {
      l.broken = e.what();
      throw;
    }
  };
  if (r.type == MsgType::kHello) {
    io([&] {
      int fd = -1;
      try {
        fd = tcp::connect_to(l.address, deadline, l.index);
      } catch (const TimeoutError& e) {
        RINGCC_THROW(TimeoutError, "could not connect to ", where, " within ", opts_.timeout, " s");
      }
      tcp::configure_data_socket(fd);
      std::lock_guard<std::mutex> lock(l.mu);
      l.fd = fd;
      if (l.closing) ::shutdown(fd, SHUT_RDWR);
    });
  }
  RINGCC_CHECK_ARG(l.fd >= 0, where, ": not connected");

  Header h;
  h.type = r.type;
  h.sender = static_cast<uint32_t>(opts_.rank);
  h.key = r.key;
  h.numel = r.type == MsgType::kHello ? static_cast<uint64_t>(opts_.num_workers) : r.numel;
  h.dtype = r.dtype;
  h.wire = r.wire;
  auto it = l.seen.find(r.key);
  h.round = it == l.seen.end() ? 0 : it->second;
  const void* payload = nullptr;
  switch (r.type) {
    case MsgType::kHello:
      payload = opts_.token.data();
      h.payload_bytes = opts_.token.size();
      break;
    case MsgType::kRegister:
      payload = r.name.data();
      h.payload_bytes = r.name.size();
      break;
    case MsgType::kInit:
      payload = r.in;
      h.payload_bytes = r.numel * 4;
      break;
    case MsgType::kPushPull:
      RINGCC_CHECK_ARG(r.numel <= kMaxKeyElements, "ps: numel ", r.numel, " above the per-key limit ",
                       kMaxKeyElements);
      h.payload_bytes = wire_bytes(r.numel, r.wire);
      if (r.wire == Compression::kNone) {
        payload = r.in;
      } else {
        l.scratch.resize(h.payload_bytes);
        kernels::compress(l.scratch.data(), r.in, r.numel, wire_type(r.wire));
        payload = l.scratch.data();
      }
      break;
    default:
      break;
  }
  Header rep;
  io([&] {
    tcp::send_all(l.fd, &h, sizeof(h), deadline, "sending a ps request");
    if (h.payload_bytes) tcp::send_all(l.fd, payload, h.payload_bytes, deadline, "sending a ps payload");
    tcp::recv_all(l.fd, &rep, sizeof(rep), deadline, "waiting for a ps reply");
    std::string bad = check_frame(rep);
    if (bad.empty() && rep.type != MsgType::kOk && rep.type != MsgType::kData && rep.type != MsgType::kError)
      bad = detail::concat("unexpected ", msg_name(rep.type), " message from the server");
    if (!bad.empty()) RINGCC_THROW(PeerError, where, ": protocol error in the reply: ", bad);
  });

  if (rep.type == MsgType::kError) {
    std::string text;
    io([&] {
      if (rep.payload_bytes > kMaxErrorText)
        RINGCC_THROW(PeerError, where, ": error text of ", rep.payload_bytes, " bytes (at most ", kMaxErrorText, ")");
      text.resize(rep.payload_bytes);
      if (!text.empty()) tcp::recv_all(l.fd, text.data(), text.size(), deadline, "reading a ps error");
    });
    auto code = static_cast<ErrorCode>(rep.code);
    if (code == ErrorCode::kAuth || code == ErrorCode::kProtocol) l.broken = text;  // the server hangs up
    raise_server_error(where, code, text);
  }

  const bool wants_data = r.type == MsgType::kPushPull || r.type == MsgType::kPull;
  if (!wants_data) {
    io([&] {
      if (rep.type != MsgType::kOk || rep.payload_bytes != 0)
        RINGCC_THROW(PeerError, where, ": ", msg_name(r.type), " got a ", msg_name(rep.type), " reply of ",
                     rep.payload_bytes, " bytes");
    });
    if (r.type == MsgType::kHello) {
      l.mode = static_cast<Mode>(rep.code);
    } else if (r.type != MsgType::kShutdown) {
      l.seen[r.key] = rep.round;
    }
    return;
  }
  // DATA: the same key and size we asked for, fp32 or the push's own wire format.
  io([&] {
    const bool wire_ok = rep.wire == Compression::kNone || (r.type == MsgType::kPushPull && rep.wire == r.wire);
    if (rep.type != MsgType::kData || rep.key != r.key || rep.numel != r.numel || !wire_ok ||
        rep.payload_bytes != wire_bytes(r.numel, rep.wire))
      RINGCC_THROW(PeerError, where, ": ", msg_name(r.type), " reply does not match the request (key ", rep.key,
                   " vs ", r.key, ", numel ", rep.numel, " vs ", r.numel, ", wire ", compression_name(rep.wire),
                   ", ", rep.payload_bytes, " bytes)");
    if (rep.wire == Compression::kNone) {
      tcp::recv_all(l.fd, r.out, rep.payload_bytes, deadline, "reading ps values");
    } else {
      l.scratch.resize(rep.payload_bytes);
      tcp::recv_all(l.fd, l.scratch.data(), rep.payload_bytes, deadline, "reading ps values");
    }
  });
  if (rep.wire != Compression::kNone)
    kernels::decompress(r.out, l.scratch.data(), r.numel, wire_type(rep.wire), false);
  l.seen[r.key] = rep.round;
}

}  // namespace ringcc::ps
