#include "ringcc/ps/ps_client.h"

#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstring>

#include "ringcc/common/clock.h"
#include "ringcc/common/hmac.h"
#include "ringcc/engine/mesh.h"
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
  std::string msg = where + ": " + peer_text(text);
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
  RINGCC_CHECK_ARG(opts_.secret.size() >= kMinSecretBytes && opts_.secret.size() <= kMaxSecretBytes,
                   "ps client: the job secret must be ", kMinSecretBytes, "..", kMaxSecretBytes, " bytes, got ",
                   opts_.secret.size());
  RINGCC_CHECK_ARG(opts_.transport == "auto" || opts_.transport == "tcp", "ps client: transport must be 'auto' or "
                   "'tcp', got '", opts_.transport, "'");
  RINGCC_CHECK_ARG(opts_.shm_region_bytes >= kMinShmRegionBytes && opts_.shm_region_bytes <= kMaxShmRegionBytes,
                   "ps client: shm region of ", opts_.shm_region_bytes, " bytes out of range [", kMinShmRegionBytes,
                   ", ", kMaxShmRegionBytes, "]");
  host_key_ = opts_.host_id.empty() ? host_identity() : opts_.host_id;
  RINGCC_CHECK_ARG(host_key_.size() <= kMaxHostIdBytes, "ps client: host id longer than ", kMaxHostIdBytes);
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

LinkStats Client::stats(int server) const {
  RINGCC_CHECK_ARG(server >= 0 && server < num_servers(), "ps client: server ", server, " out of range");
  const Link& l = *links_[server];
  return LinkStats{static_cast<bool>(l.shm), l.shm_payloads.load(), l.tcp_payloads.load()};
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

// HELLO (our challenge) -> CHALLENGE (the server's challenge and proof) -> AUTH (our
// proof) -> OK (the mode). The server proves itself first, so a process of another job
// at a stale address learns nothing from this worker but a random challenge.
void Client::authenticate(Link& l, const Deadline& deadline, const std::string& where) {
  auto reply = [&](MsgType request) {
    Header rep;
    tcp::recv_all(l.fd, &rep, sizeof(rep), deadline, "waiting for a ps reply");
    Header req;
    req.type = request;
    if (std::string bad = check_reply(rep, req, 0); !bad.empty())
      RINGCC_THROW(PeerError, where, ": protocol error in the reply: ", bad);
    if (rep.type == MsgType::kError) {
      std::string text(rep.payload_bytes, '\0');  // <= kMaxErrorText (check_reply)
      if (!text.empty()) tcp::recv_all(l.fd, text.data(), text.size(), deadline, "reading a ps error");
      raise_server_error(where, static_cast<ErrorCode>(rep.code), text);  // the server hangs up
    }
    return rep;
  };
  const uint32_t rank = static_cast<uint32_t>(opts_.rank);
  const uint64_t workers = static_cast<uint64_t>(opts_.num_workers);
  uint8_t mine[kChallengeBytes];
  auth::secure_random(mine, sizeof(mine));
  Header h;
  h.type = MsgType::kHello;
  h.sender = rank;
  h.numel = workers;
  h.payload_bytes = sizeof(mine);
  tcp::send_all(l.fd, &h, sizeof(h), deadline, "sending HELLO");
  tcp::send_all(l.fd, mine, sizeof(mine), deadline, "sending HELLO");
  reply(MsgType::kHello);
  uint8_t body[kChallengeBytes + auth::kDigestBytes];
  tcp::recv_all(l.fd, body, sizeof(body), deadline, "reading the server's challenge");
  auth::Digest want = handshake_proof(opts_.secret, 'S', rank, workers, mine, body);
  if (!auth::constant_time_equal(want.data(), body + kChallengeBytes, want.size()))
    RINGCC_THROW(PeerError, where, " could not prove it knows the job secret (a server of another job at that "
                 "address?)");
  auth::Digest proof = handshake_proof(opts_.secret, 'C', rank, workers, mine, body);
  h = Header();
  h.type = MsgType::kAuth;
  h.sender = rank;
  h.payload_bytes = proof.size();
  tcp::send_all(l.fd, &h, sizeof(h), deadline, "sending AUTH");
  tcp::send_all(l.fd, proof.data(), proof.size(), deadline, "sending AUTH");
  l.mode = static_cast<Mode>(reply(MsgType::kAuth).code);
}

// After authenticating: if the server is on this host, give it a shared-memory object for the
// payloads of this connection. A refusal or local failure is not an error: the
// connection keeps using TCP, and says so once. Socket failures propagate.
void Client::attach_shm(Link& l, const Deadline& deadline, const std::string& where) {
  auto ask = [&](MsgType type, const std::string& payload, uint64_t aux, std::string* refusal) {
    Header h;
    h.type = type;
    h.sender = static_cast<uint32_t>(opts_.rank);
    h.aux = aux;
    h.payload_bytes = payload.size();
    tcp::send_all(l.fd, &h, sizeof(h), deadline, "sending a ps request");
    if (!payload.empty()) tcp::send_all(l.fd, payload.data(), payload.size(), deadline, "sending a ps payload");
    Header rep;
    tcp::recv_all(l.fd, &rep, sizeof(rep), deadline, "waiting for a ps reply");
    if (std::string bad = check_reply(rep, h, 0); !bad.empty())
      RINGCC_THROW(PeerError, where, ": protocol error in the reply: ", bad);
    if (rep.type == MsgType::kError) {
      std::string text(rep.payload_bytes, '\0');  // <= kMaxErrorText (check_reply)
      if (!text.empty()) tcp::recv_all(l.fd, text.data(), text.size(), deadline, "reading a ps error");
      *refusal = text.empty() ? "refused" : peer_text(text);
    }
    return rep;
  };
  auto fall_back = [&](const std::string& why) {
    std::fprintf(stderr, "ringcc: ps worker %d, %s: shared memory not used (%s); payloads go over TCP\n",
                 opts_.rank, where.c_str(), why.c_str());
  };
  std::string refusal;
  Header rep = ask(MsgType::kShmProbe, host_key_, 0, &refusal);
  if (!refusal.empty()) return fall_back(refusal);
  if (rep.code != 1) return;  // another host, or a TCP-only server: nothing failed
  transport::shm::Mapping m;
  try {
    m = transport::shm::Mapping::create(std::string(kShmNamePrefix) + std::to_string(opts_.rank) + "-",
                                        2 * opts_.shm_region_bytes);
  } catch (const std::exception& e) {
    return fall_back(e.what());
  }
  rep = ask(MsgType::kShmAttach, m.name(), opts_.shm_region_bytes, &refusal);
  // Mapped by the server or never will be: the name goes now, so /dev/shm holds
  // nothing even if either process is killed later.
  m.unlink();
  if (!refusal.empty()) return fall_back(refusal);
  l.shm_region = opts_.shm_region_bytes;
  l.shm = std::move(m);
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
    io([&] {
      authenticate(l, deadline, where);
      if (opts_.transport != "tcp") attach_shm(l, deadline, where);
    });
    return;
  }
  RINGCC_CHECK_ARG(l.fd >= 0, where, ": not connected");

  Header h;
  h.type = r.type;
  h.sender = static_cast<uint32_t>(opts_.rank);
  h.key = r.key;
  h.numel = r.numel;
  h.dtype = r.dtype;
  h.wire = r.wire;
  auto it = l.seen.find(r.key);
  h.round = it == l.seen.end() ? 0 : it->second;
  const void* payload = nullptr;
  // INIT and PUSH_PULL payloads that fit go into the request region instead.
  char* region = nullptr;
  if ((r.type == MsgType::kInit || r.type == MsgType::kPushPull) && l.shm &&
      wire_bytes(r.numel, r.type == MsgType::kInit ? Compression::kNone : r.wire) <= l.shm_region)
    region = l.shm.data();
  switch (r.type) {
    case MsgType::kRegister:
      payload = r.name.data();
      h.payload_bytes = r.name.size();
      break;
    case MsgType::kInit:
      payload = r.in;
      h.payload_bytes = r.numel * 4;
      if (region) std::memcpy(region, r.in, h.payload_bytes);
      break;
    case MsgType::kPushPull:
      RINGCC_CHECK_ARG(r.numel <= kMaxKeyElements, "ps: numel ", r.numel, " above the per-key limit ",
                       kMaxKeyElements);
      h.payload_bytes = wire_bytes(r.numel, r.wire);
      if (r.wire == Compression::kNone) {
        payload = r.in;
        if (region) std::memcpy(region, r.in, h.payload_bytes);
      } else if (region) {
        kernels::compress(region, r.in, r.numel, wire_type(r.wire));
      } else {
        l.scratch.resize(h.payload_bytes);
        kernels::compress(l.scratch.data(), r.in, r.numel, wire_type(r.wire));
        payload = l.scratch.data();
      }
      break;
    default:
      break;
  }
  if (region) {
    h.flags = kFlagShmPayload;
    std::atomic_thread_fence(std::memory_order_release);  // the region, then the header
    l.shm_payloads.fetch_add(1, std::memory_order_relaxed);
  } else if (r.type == MsgType::kInit || r.type == MsgType::kPushPull) {
    l.tcp_payloads.fetch_add(1, std::memory_order_relaxed);
  }
  Header rep;
  io([&] {
    tcp::send_all(l.fd, &h, sizeof(h), deadline, "sending a ps request");
    if (h.payload_bytes && !region) tcp::send_all(l.fd, payload, h.payload_bytes, deadline, "sending a ps payload");
    tcp::recv_all(l.fd, &rep, sizeof(rep), deadline, "waiting for a ps reply");
    // Every length is bounded here, before anything is read: only DATA may sit in shared
    // memory, and only in a region this link has.
    if (std::string bad = check_reply(rep, h, l.shm ? l.shm_region : 0); !bad.empty())
      RINGCC_THROW(PeerError, where, ": protocol error in the reply: ", bad);
  });

  if (rep.type == MsgType::kError) {
    std::string text;
    io([&] {
      text.resize(rep.payload_bytes);  // <= kMaxErrorText (check_reply)
      if (!text.empty()) tcp::recv_all(l.fd, text.data(), text.size(), deadline, "reading a ps error");
    });
    auto code = static_cast<ErrorCode>(rep.code);
    if (code == ErrorCode::kAuth || code == ErrorCode::kProtocol) l.broken = text;  // the server hangs up
    raise_server_error(where, code, text);
  }

  const bool wants_data = r.type == MsgType::kPushPull || r.type == MsgType::kPull;
  if (!wants_data) {  // an OK without payload (check_reply)
    if (r.type != MsgType::kShutdown) {
      l.seen[r.key] = rep.round;
    }
    return;
  }
  // DATA: the same key and size we asked for, fp32 or the push's own wire format.
  io([&] {
    if (rep.flags & kFlagShmPayload) return;
    l.tcp_payloads.fetch_add(1, std::memory_order_relaxed);
    if (rep.wire == Compression::kNone) {
      tcp::recv_all(l.fd, r.out, rep.payload_bytes, deadline, "reading ps values");
    } else {
      l.scratch.resize(rep.payload_bytes);
      tcp::recv_all(l.fd, l.scratch.data(), rep.payload_bytes, deadline, "reading ps values");
    }
  });
  if (rep.flags & kFlagShmPayload) {  // sizes checked above; the reply region holds it
    std::atomic_thread_fence(std::memory_order_acquire);
    const char* src = l.shm.data() + l.shm_region;
    if (rep.wire == Compression::kNone)
      std::memcpy(r.out, src, rep.payload_bytes);
    else
      kernels::decompress(r.out, src, r.numel, wire_type(rep.wire), false);
    l.shm_payloads.fetch_add(1, std::memory_order_relaxed);
  } else if (rep.wire != Compression::kNone) {
    kernels::decompress(r.out, l.scratch.data(), r.numel, wire_type(rep.wire), false);
  }
  l.seen[r.key] = rep.round;
}

}  // namespace ringcc::ps
