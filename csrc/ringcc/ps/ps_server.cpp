#include "ringcc/ps/ps_server.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <set>
#include <unordered_map>
#include <vector>

#include "ringcc/common/clock.h"
#include "ringcc/common/error.h"
#include "ringcc/common/hmac.h"
#include "ringcc/engine/mesh.h"
#include "ringcc/kernels/cpu/compress.h"
#include "ringcc/kernels/cpu/kernels.h"
#include "ringcc/transport/shm/shm_segment.h"
#include "ringcc/transport/tcp/socket.h"

namespace ringcc::ps {
namespace {

using Bytes = std::vector<char>;

struct OutMsg {
  Header hdr;
  std::shared_ptr<const Bytes> body;  // shared: one sync result goes to every worker
  size_t sent = 0;                    // of header + body
};

struct Conn {
  uint64_t id = 0;
  int fd = -1;
  int rank = -1;
  std::string addr;  // the peer's, for log lines
  // Handshake: HELLO brings the worker's challenge and claims; AUTH its proof.
  bool authed = false;
  bool challenged = false;
  uint32_t claimed_rank = 0;
  uint64_t claimed_workers = 0;
  uint8_t client_challenge[kChallengeBytes] = {};
  uint8_t server_challenge[kChallengeBytes] = {};
  Clock::time_point auth_deadline;  // unauthenticated connections are dropped after it
  bool close_after_flush = false;  // refused peer: say why, then hang up
  bool dead = false;
  // Reading: a header, then its body (or bytes to drop after a refused request).
  Header hdr;
  size_t hdr_got = 0;
  bool in_body = false;
  Bytes body;
  size_t body_got = 0;
  uint64_t discard_left = 0;
  std::deque<OutMsg> out;
  // Same-host worker: requests at shm.data(), replies at shm.data() + shm_region.
  bool shm_offered = false;  // SHM_PROBE matched; one SHM_ATTACH may follow
  transport::shm::Mapping shm;
  uint64_t shm_region = 0;
};

bool in_shm(const Header& h) { return (h.flags & kFlagShmPayload) != 0; }

struct Waiter {
  uint64_t conn;
  Compression wire;
};

struct Key {
  uint64_t id = 0;
  std::string name;
  uint64_t numel = 0;
  DataType dtype = DataType::kFloat32;
  std::vector<float> values;    // sync: the last round's average; async: the parameters
  std::vector<float> momentum;  // async, allocated on the first push when momentum != 0
  uint64_t version = 0;         // sync: completed rounds; async: updates applied
  // The sync round in progress.
  std::vector<float> acc;
  std::vector<int> pushed;
  std::vector<Waiter> waiters;
  Clock::time_point deadline;
};

std::string label(const Key& k) { return detail::concat("key '", k.name, "' (id ", k.id, ")"); }

std::string rank_list(const std::vector<int>& ranks) {
  std::string s = "[";
  for (size_t i = 0; i < ranks.size(); ++i) s += (i ? ", " : "") + std::to_string(ranks[i]);
  return s + "]";
}

}  // namespace

struct Server::Impl {
  explicit Impl(const ServerOptions& o) : o(o), host_key(o.host_id.empty() ? host_identity() : o.host_id) {}

  const ServerOptions& o;
  const std::string host_key;
  std::string address;  // where it listens, for log lines
  std::unique_ptr<transport::tcp::Listener> listener;
  int wake[2] = {-1, -1};
  std::atomic<bool> stop_requested{false};
  std::map<uint64_t, std::unique_ptr<Conn>> conns;
  std::unordered_map<uint64_t, Key> keys;
  std::set<uint64_t> open_rounds;  // sync keys with a round in progress
  std::set<int> finished;          // ranks that sent SHUTDOWN
  bool draining = false;
  Clock::time_point drain_deadline;
  uint64_t next_conn = 1;
  std::vector<float> grad;         // decoded async gradient
  Bytes sink;                      // refused payloads are read into this and dropped
  bool fixed_keys = false;         // restored from a checkpoint: no new keys
  // snapshot(): the caller asks, the loop answers at the top of its next iteration.
  std::mutex snap_mu;
  std::condition_variable snap_cv;
  bool snap_wanted = false;
  bool snap_ready = false;
  bool loop_exited = false;
  std::vector<KeyState> snap_out;

  ~Impl() {
    for (auto& [id, c] : conns) ::close(c->fd);
    for (int fd : wake)
      if (fd >= 0) ::close(fd);
  }

  // ------------------------------------------------------------------ checkpoints
  std::vector<KeyState> take_snapshot() const {
    std::vector<KeyState> out;
    out.reserve(keys.size());
    for (const auto& [id, k] : keys)
      out.push_back(KeyState{k.id, k.name, k.numel, k.dtype, k.version, k.values, k.momentum});
    // Stable order, so two snapshots of the same state write the same file.
    std::sort(out.begin(), out.end(), [](const KeyState& a, const KeyState& b) { return a.id < b.id; });
    return out;
  }
  void serve_snapshot() {
    std::lock_guard<std::mutex> lock(snap_mu);
    if (!snap_wanted) return;
    snap_out = take_snapshot();
    snap_wanted = false;
    snap_ready = true;
    snap_cv.notify_all();
  }

  // ------------------------------------------------------------------ replies
  void send(Conn& c, Header h, std::shared_ptr<const Bytes> body = nullptr) {
    h.magic = kPsMagic;
    h.version = kPsProtocolVersion;
    if (!in_shm(h)) h.payload_bytes = body ? body->size() : 0;
    c.out.push_back(OutMsg{h, std::move(body), 0});
  }
  void send_ok(Conn& c, uint64_t key, uint64_t round, uint8_t code = 0) {
    Header h;
    h.type = MsgType::kOk;
    h.key = key;
    h.round = round;
    h.code = code;
    h.aux = static_cast<uint64_t>(o.num_workers);
    send(c, h);
  }
  void send_error(Conn& c, uint64_t key, ErrorCode code, std::string text) {
    if (text.size() > kMaxErrorText) text.resize(kMaxErrorText);
    Header h;
    h.type = MsgType::kError;
    h.key = key;
    h.code = static_cast<uint8_t>(code);
    send(c, h, std::make_shared<Bytes>(text.begin(), text.end()));
  }
  std::shared_ptr<const Bytes> encode(const std::vector<float>& v, Compression wire) {
    auto b = std::make_shared<Bytes>(wire_bytes(v.size(), wire));
    if (wire == Compression::kNone) {
      if (!v.empty()) std::memcpy(b->data(), v.data(), v.size() * 4);
    } else {
      kernels::compress(b->data(), v.data(), v.size(), wire_type(wire));
    }
    return b;
  }
  // A DATA reply of k's values in `wire`. `*cache` holds the encoded bytes, made at most
  // once for all the waiters of a sync round. A same-host worker gets them in its reply
  // region (fp32 straight from the key); the header alone goes on the socket.
  void send_values(Conn& c, const Key& k, Compression wire, std::shared_ptr<const Bytes>* cache) {
    Header h;
    h.type = MsgType::kData;
    h.key = k.id;
    h.numel = k.numel;
    h.dtype = k.dtype;
    h.wire = wire;
    h.round = k.version;
    const uint64_t n = wire_bytes(k.numel, wire);
    if (c.shm && n <= c.shm_region) {
      char* dst = c.shm.data() + c.shm_region;
      if (wire == Compression::kNone) {
        std::memcpy(dst, k.values.data(), n);
      } else {
        if (!*cache) *cache = encode(k.values, wire);
        std::memcpy(dst, (*cache)->data(), n);
      }
      std::atomic_thread_fence(std::memory_order_release);  // before the header is sent
      h.flags = kFlagShmPayload;
      h.payload_bytes = n;
      return send(c, h);
    }
    if (!*cache) *cache = encode(k.values, wire);
    send(c, h, *cache);
  }
  void send_values(Conn& c, const Key& k) {
    std::shared_ptr<const Bytes> cache;
    send_values(c, k, Compression::kNone, &cache);
  }

  // ------------------------------------------------------------------ requests
  Key* find(uint64_t id) {
    auto it = keys.find(id);
    return it == keys.end() ? nullptr : &it->second;
  }

  // The server's screening of a request header (ps_protocol.cpp), before a byte of its
  // payload is read or allocated.
  bool refuse_header(const Conn& c, const Header& h, Refusal* r) {
    RequestState st;
    st.authed = c.authed;
    st.challenged = c.challenged;
    st.shm_offered = c.shm_offered;
    st.shm_attached = static_cast<bool>(c.shm);
    st.shm_region = c.shm_region;
    st.fixed_keys = fixed_keys;
    KeyShape shape;
    const Key* k = find(h.key);
    if (k) shape = KeyShape{k->id, k->name, k->numel, k->dtype};
    return screen_request(st, h, k ? &shape : nullptr, r);
  }

  void on_header(Conn& c) {
    const Header& h = c.hdr;
    Refusal r;
    if (refuse_header(c, h, &r)) {
      if (r.code == ErrorCode::kAuth || (r.code == ErrorCode::kProtocol && !c.authed)) log_reject(c, r.text);
      send_error(c, h.key, r.code, r.text);
      if (r.code == ErrorCode::kAuth || r.code == ErrorCode::kProtocol) {
        c.close_after_flush = true;
        return;
      }
      if (in_shm(h)) return;  // nothing follows on the socket
      if (h.payload_bytes > kMaxDiscardBytes) {
        c.close_after_flush = true;
      } else {
        c.discard_left = h.payload_bytes;
        c.in_body = c.discard_left > 0;
      }
      return;
    }
    if (in_shm(h)) {  // the payload is already in the request region
      std::atomic_thread_fence(std::memory_order_acquire);
      return on_message(c);
    }
    c.body.resize(h.payload_bytes);  // bounded by refuse_header
    c.body_got = 0;
    c.in_body = h.payload_bytes > 0;
    if (!c.in_body) on_message(c);
  }

  // The request's payload: the request region (checked in refuse_header) or the body.
  const char* payload(const Conn& c) const { return in_shm(c.hdr) ? c.shm.data() : c.body.data(); }

  void on_message(Conn& c) {
    const Header& h = c.hdr;
    switch (h.type) {
      case MsgType::kHello: return on_hello(c, h);
      case MsgType::kAuth: return on_auth(c, h);
      case MsgType::kRegister: return on_register(c, h);
      case MsgType::kShmProbe: {
        // Shared memory only where both sides name the same host and neither opted out.
        std::string id(c.body.begin(), c.body.end());
        c.shm_offered = o.transport != "tcp" && id == host_key;
        return send_ok(c, 0, 0, c.shm_offered ? 1 : 0);
      }
      case MsgType::kShmAttach: return on_shm_attach(c, h);
      case MsgType::kInit: {
        Key& k = *find(h.key);
        std::memcpy(k.values.data(), payload(c), k.numel * 4);
        k.momentum.clear();
        return send_ok(c, k.id, k.version);
      }
      case MsgType::kPushPull:
        return o.mode == Mode::kSync ? push_sync(c, h, *find(h.key)) : push_async(c, h, *find(h.key));
      case MsgType::kPull: {
        return send_values(c, *find(h.key));
      }
      case MsgType::kShutdown:
        send_ok(c, 0, 0);
        finished.insert(c.rank);
        if (static_cast<int>(finished.size()) == o.num_workers && !draining) {
          draining = true;  // flush the last replies, then end
          drain_deadline = Clock::now() + std::chrono::seconds(5);
        }
        return;
      default:
        return;  // refused in refuse_header
    }
  }

  void log_reject(const Conn& c, const std::string& why) const {
    // The secret never appears here: the address, and what was wrong.
    std::fprintf(stderr, "ringcc: ps server at %s rejected a connection from %s: %s\n", address.c_str(),
                 c.addr.c_str(), why.c_str());
  }

  // HELLO: the worker's challenge and claims (rank, num_workers). The server proves it
  // knows the secret over both challenges and sends its own challenge.
  void on_hello(Conn& c, const Header& h) {
    std::memcpy(c.client_challenge, c.body.data(), kChallengeBytes);
    c.claimed_rank = h.sender;
    c.claimed_workers = h.numel;
    auth::secure_random(c.server_challenge, kChallengeBytes);
    auth::Digest p = handshake_proof(o.secret, 'S', c.claimed_rank, c.claimed_workers, c.client_challenge,
                                     c.server_challenge);
    auto body = std::make_shared<Bytes>(kChallengeBytes + p.size());
    std::memcpy(body->data(), c.server_challenge, kChallengeBytes);
    std::memcpy(body->data() + kChallengeBytes, p.data(), p.size());
    c.challenged = true;
    Header r;
    r.type = MsgType::kChallenge;
    send(c, r, std::move(body));
  }

  // AUTH: the worker's proof over both challenges; then its claims are checked.
  void on_auth(Conn& c, const Header& h) {
    auto refuse = [&](ErrorCode code, std::string text) {
      log_reject(c, text);
      send_error(c, 0, code, "AUTH: " + text);
      c.close_after_flush = true;
    };
    auth::Digest want = handshake_proof(o.secret, 'C', c.claimed_rank, c.claimed_workers, c.client_challenge,
                                        c.server_challenge);
    if (!auth::constant_time_equal(want.data(), c.body.data(), want.size()))
      return refuse(ErrorCode::kAuth, "authentication failed: wrong proof of the job secret (a worker of another "
                    "job, or a replayed handshake?)");
    const uint32_t rank = c.claimed_rank;
    if (rank >= static_cast<uint32_t>(o.num_workers))
      return refuse(ErrorCode::kBadRequest, detail::concat("worker rank ", rank, " out of range [0, ",
                                                           o.num_workers, ")"));
    if (c.claimed_workers != static_cast<uint64_t>(o.num_workers))
      return refuse(ErrorCode::kBadRequest, detail::concat("worker ", rank, " expects ", c.claimed_workers,
                                                           " workers; this server was started for ", o.num_workers));
    // A worker may reconnect once its old connection is gone (dead ones count as gone
    // even before the loop closes them).
    bool taken = false;
    for (auto& [id, other] : conns) taken |= other.get() != &c && other->authed && !other->dead && other->rank == int(rank);
    if (taken) return refuse(ErrorCode::kBadRequest, detail::concat("worker rank ", rank, " is already connected"));
    c.authed = true;
    c.rank = static_cast<int>(rank);
    send_ok(c, 0, 0, static_cast<uint8_t>(o.mode));
  }

  void on_shm_attach(Conn& c, const Header& h) {
    c.shm_offered = false;
    std::string name(c.body.begin(), c.body.end());
    if (!transport::shm::is_ringcc_object_name(name, kShmNamePrefix, kMaxShmNameBytes))
      return send_error(c, 0, ErrorCode::kBadRequest,
                        detail::concat("SHM_ATTACH: '", name, "' is not a ringcc parameter-server object name"));
    try {
      // Exactly two regions of h.aux bytes, owned by this user; checked before mapping.
      c.shm = transport::shm::Mapping::open(name, 2 * h.aux);
    } catch (const std::exception& e) {
      return send_error(c, 0, ErrorCode::kBadRequest, detail::concat("SHM_ATTACH: ", e.what()));
    }
    c.shm_region = h.aux;
    send_ok(c, 0, 0, 1);
  }

  void on_register(Conn& c, const Header& h) {
    std::string name(c.body.begin(), c.body.end());
    if (Key* k = find(h.key)) {
      if (k->name != name)
        return send_error(c, h.key, ErrorCode::kBadRequest,
                          detail::concat("REGISTER: key id ", h.key, " is registered as '", k->name,
                                         "'; this REGISTER names it '", name, "'"));
      return send_ok(c, k->id, k->version);
    }
    Key& k = keys[h.key];
    k.id = h.key;
    k.name = name;
    k.numel = h.numel;
    k.dtype = h.dtype;
    k.values.assign(h.numel, 0.0f);
    send_ok(c, k.id, k.version);
  }

  void push_sync(Conn& c, const Header& h, Key& k) {
    if (h.round != k.version)
      return send_error(c, k.id, ErrorCode::kBadRequest,
                        detail::concat("PUSH_PULL: worker ", c.rank, " pushed round ", h.round, " of ", label(k),
                                       ", which is at round ", k.version, " (workers out of step)"));
    if (std::find(k.pushed.begin(), k.pushed.end(), c.rank) != k.pushed.end())
      return send_error(c, k.id, ErrorCode::kBadRequest,
                        detail::concat("PUSH_PULL: worker ", c.rank, " pushed round ", h.round, " of ", label(k),
                                       " twice"));
    // fp32 accumulation in arrival order; every worker receives the same bits.
    const void* g = payload(c);
    if (k.pushed.empty()) {
      k.acc.resize(k.numel);
      if (h.wire == Compression::kNone)
        std::memcpy(k.acc.data(), g, k.numel * 4);
      else
        kernels::decompress(k.acc.data(), g, k.numel, wire_type(h.wire), false);
      k.deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(o.timeout));
      open_rounds.insert(k.id);
    } else if (h.wire == Compression::kNone) {
      kernels::reduce(k.acc.data(), k.acc.data(), g, k.numel, DataType::kFloat32, ReduceOp::kSum);
    } else {
      kernels::decompress(k.acc.data(), g, k.numel, wire_type(h.wire), true);
    }
    k.pushed.push_back(c.rank);
    k.waiters.push_back(Waiter{c.id, h.wire});
    if (static_cast<int>(k.pushed.size()) < o.num_workers) return;
    kernels::divide(k.acc.data(), k.numel, DataType::kFloat32, static_cast<double>(o.num_workers));
    k.values.swap(k.acc);
    k.version += 1;
    std::shared_ptr<const Bytes> bodies[3];
    for (const Waiter& w : k.waiters) {
      auto it = conns.find(w.conn);
      if (it == conns.end() || it->second->dead) continue;  // gone since it pushed
      send_values(*it->second, k, w.wire, &bodies[static_cast<int>(w.wire)]);
    }
    end_round(k);
  }

  void end_round(Key& k) {
    k.pushed.clear();
    k.waiters.clear();
    open_rounds.erase(k.id);
  }

  void expire_rounds(Clock::time_point now) {
    std::vector<uint64_t> expired;
    for (uint64_t id : open_rounds)
      if (keys[id].deadline <= now) expired.push_back(id);
    for (uint64_t id : expired) {
      Key& k = keys[id];
      std::vector<int> missing;
      for (int r = 0; r < o.num_workers; ++r)
        if (std::find(k.pushed.begin(), k.pushed.end(), r) == k.pushed.end()) missing.push_back(r);
      std::string text = detail::concat("PUSH_PULL: sync round ", k.version, " of ", label(k), " timed out after ",
                                        o.timeout, " s: no push from worker(s) ", rank_list(missing),
                                        " (pushed: ", rank_list(k.pushed), ")");
      for (const Waiter& w : k.waiters) {
        auto it = conns.find(w.conn);
        if (it != conns.end()) send_error(*it->second, k.id, ErrorCode::kTimeout, text);
      }
      end_round(k);  // the round may be retried; its partial sum is dropped
    }
  }

  // A connection that has not proved itself within the bound is a stray: it is told why
  // (a slow genuine worker gets a readable error) and closed.
  void expire_handshakes(Clock::time_point now) {
    for (auto& [id, c] : conns) {
      if (c->authed || c->close_after_flush || c->dead || c->auth_deadline > now) continue;
      std::string why = detail::concat("no authentication within ", o.handshake_timeout,
                                       " s (RINGCC_HANDSHAKE_TIMEOUT)");
      log_reject(*c, why);
      send_error(*c, 0, ErrorCode::kAuth, why);
      c->close_after_flush = true;  // written and dropped below, in this iteration
    }
  }

  void push_async(Conn& c, const Header& h, Key& k) {
    if (h.round > k.version)
      return send_error(c, k.id, ErrorCode::kBadRequest,
                        detail::concat("PUSH_PULL: worker ", c.rank, " claims version ", h.round, " of ", label(k),
                                       ", which is only at version ", k.version));
    if (k.version - h.round > o.staleness)
      return send_error(c, k.id, ErrorCode::kStale,
                        detail::concat("PUSH_PULL: stale push from worker ", c.rank, " to ", label(k),
                                       ": computed from version ", h.round, ", the key is at version ", k.version,
                                       ", staleness bound ", o.staleness, " (pull fresh parameters and push again)"));
    const float* g = reinterpret_cast<const float*>(payload(c));
    if (h.wire != Compression::kNone) {
      grad.resize(k.numel);
      kernels::decompress(grad.data(), payload(c), k.numel, wire_type(h.wire), false);
      g = grad.data();
    }
    // torch.optim.SGD (dampening 0, no Nesterov): d = g + wd*p; buf = m*buf + d; p -= lr*buf.
    const float lr = o.lr, mom = o.momentum, wd = o.weight_decay;
    float* p = k.values.data();
    if (mom != 0.0f && k.momentum.empty()) k.momentum.assign(k.numel, 0.0f);
    float* buf = k.momentum.data();
    for (uint64_t i = 0; i < k.numel; ++i) {
      float d = g[i];
      if (wd != 0.0f) d = d + wd * p[i];
      if (mom != 0.0f) {
        buf[i] = mom * buf[i] + d;
        d = buf[i];
      }
      p[i] = p[i] - lr * d;
    }
    k.version += 1;
    send_values(c, k);
  }

  // ------------------------------------------------------------------ sockets
  void accept_all() {
    for (;;) {
      int fd = ::accept4(listener->fd(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (fd < 0) {
        if (errno == EINTR) continue;
        return;  // EAGAIN, or a connection that died before we took it
      }
      transport::tcp::configure_data_socket(fd);
      auto c = std::make_unique<Conn>();
      c->id = next_conn++;
      c->fd = fd;
      c->addr = transport::tcp::peer_address(fd);
      c->auth_deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                            std::chrono::duration<double>(o.handshake_timeout));
      conns.emplace(c->id, std::move(c));
    }
  }

  void on_readable(Conn& c) {
    size_t budget = 8 << 20;  // then let the others have a turn
    while (budget > 0 && !c.dead && !c.close_after_flush) {
      char* dst;
      size_t want;
      if (!c.in_body) {
        dst = reinterpret_cast<char*>(&c.hdr) + c.hdr_got;
        want = kPsHeaderBytes - c.hdr_got;
      } else if (c.discard_left > 0) {
        if (sink.size() < (64 << 10)) sink.resize(64 << 10);
        dst = sink.data();
        want = static_cast<size_t>(std::min<uint64_t>(c.discard_left, sink.size()));
      } else {
        dst = c.body.data() + c.body_got;
        want = c.body.size() - c.body_got;
      }
      ssize_t n = ::recv(c.fd, dst, want, MSG_DONTWAIT);
      if (n == 0) {
        c.dead = true;
        return;
      }
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) c.dead = true;
        return;
      }
      budget -= std::min(budget, static_cast<size_t>(n));
      if (!c.in_body) {
        c.hdr_got += n;
        if (c.hdr_got == kPsHeaderBytes) {
          c.hdr_got = 0;
          on_header(c);
        }
      } else if (c.discard_left > 0) {
        c.discard_left -= n;
        if (c.discard_left == 0) c.in_body = false;
      } else {
        c.body_got += n;
        if (c.body_got == c.body.size()) {
          c.in_body = false;
          on_message(c);
        }
      }
    }
  }

  void on_writable(Conn& c) {
    while (!c.out.empty()) {
      OutMsg& m = c.out.front();
      size_t body = m.body ? m.body->size() : 0;
      iovec iov[2];
      int n_iov = 0;
      if (m.sent < kPsHeaderBytes) {
        iov[n_iov++] = {reinterpret_cast<char*>(&m.hdr) + m.sent, kPsHeaderBytes - m.sent};
        if (body) iov[n_iov++] = {const_cast<char*>(m.body->data()), body};
      } else {
        size_t off = m.sent - kPsHeaderBytes;
        iov[n_iov++] = {const_cast<char*>(m.body->data()) + off, body - off};
      }
      msghdr mh{};
      mh.msg_iov = iov;
      mh.msg_iovlen = n_iov;
      ssize_t n = ::sendmsg(c.fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) c.dead = true;
        return;
      }
      m.sent += static_cast<size_t>(n);
      if (m.sent == kPsHeaderBytes + body) c.out.pop_front();
    }
  }

  void drop(uint64_t id) {
    auto it = conns.find(id);
    Conn& c = *it->second;
    // A sync round keeps this worker's contribution; its reply is simply not sent.
    ::close(c.fd);
    conns.erase(it);
  }

  bool all_flushed() const {
    for (auto& [id, c] : conns)
      if (!c->out.empty()) return false;
    return true;
  }

  void loop() {
    std::vector<pollfd> fds;
    std::vector<uint64_t> ids;
    for (;;) {
      serve_snapshot();  // between requests: every key is at a consistent point
      if (stop_requested.load()) return;
      auto now = Clock::now();
      if (draining && (all_flushed() || now >= drain_deadline)) return;
      fds.clear();
      ids.clear();
      fds.push_back({wake[0], POLLIN, 0});
      if (!draining) fds.push_back({listener->fd(), POLLIN, 0});
      for (auto& [id, c] : conns) {
        short ev = c->close_after_flush ? 0 : POLLIN;
        if (!c->out.empty()) ev |= POLLOUT;
        fds.push_back({c->fd, ev, 0});
        ids.push_back(id);
      }
      int timeout_ms = -1;
      Clock::time_point next = Clock::time_point::max();
      for (uint64_t id : open_rounds) next = std::min(next, keys[id].deadline);
      for (auto& [id, c] : conns)
        if (!c->authed && !c->close_after_flush) next = std::min(next, c->auth_deadline);
      if (draining) next = std::min(next, drain_deadline);
      if (next != Clock::time_point::max()) {
        auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(next - now).count() + 1;
        timeout_ms = static_cast<int>(std::clamp<int64_t>(ms, 0, 1000));
      }
      int rc = ::poll(fds.data(), fds.size(), timeout_ms);
      if (rc < 0 && errno != EINTR) RINGCC_THROW(Error, "ps server: poll failed: ", detail::errno_string(errno));
      if (rc > 0) {
        size_t base = 1;
        if (fds[0].revents) {
          char tmp[64];
          while (::read(wake[0], tmp, sizeof(tmp)) > 0) {
          }
        }
        if (!draining) {
          if (fds[1].revents & POLLIN) accept_all();
          base = 2;
        }
        for (size_t i = 0; i < ids.size(); ++i) {
          short re = fds[base + i].revents;
          if (!re) continue;
          Conn& c = *conns.at(ids[i]);
          if (re & (POLLIN | POLLHUP | POLLERR)) {
            if (c.close_after_flush && !(re & POLLIN)) c.dead = true;
            else on_readable(c);
          }
          if (!c.dead && (re & POLLOUT)) on_writable(c);
        }
      }
      expire_handshakes(Clock::now());
      // Replies queued while reading (e.g. a completed sync round for other workers)
      // go out now rather than after the next poll.
      for (auto& [id, c] : conns)
        if (!c->dead && !c->out.empty()) on_writable(*c);
      std::vector<uint64_t> gone;
      for (auto& [id, c] : conns)
        if (c->dead || (c->close_after_flush && c->out.empty())) gone.push_back(id);
      for (uint64_t id : gone) drop(id);
      if (!open_rounds.empty()) expire_rounds(Clock::now());
    }
  }
};

Server::Server(ServerOptions opts) : opts_(std::move(opts)) {
  RINGCC_CHECK_ARG(opts_.num_workers >= 1, "ps server: num_workers must be >= 1, got ", opts_.num_workers);
  RINGCC_CHECK_ARG(opts_.timeout > 0, "ps server: timeout must be positive, got ", opts_.timeout);
  RINGCC_CHECK_ARG(opts_.transport == "auto" || opts_.transport == "tcp", "ps server: transport must be 'auto' or "
                   "'tcp', got '", opts_.transport, "'");
  RINGCC_CHECK_ARG(opts_.secret.size() >= kMinSecretBytes && opts_.secret.size() <= kMaxSecretBytes,
                   "ps server: the job secret must be ", kMinSecretBytes, "..", kMaxSecretBytes, " bytes, got ",
                   opts_.secret.size());
  RINGCC_CHECK_ARG(opts_.handshake_timeout > 0, "ps server: handshake_timeout must be positive, got ",
                   opts_.handshake_timeout);
}

Server::~Server() { stop(); }

void Server::start() {
  RINGCC_CHECK_ARG(!impl_, "ps server: start() called twice");
  auto impl = std::make_unique<Impl>(opts_);
  impl->listener = std::make_unique<transport::tcp::Listener>(opts_.listen_host, 128);
  RINGCC_SYSCHECK(::pipe2(impl->wake, O_NONBLOCK | O_CLOEXEC), "ps server wake-up pipe");
  address_ = impl->listener->address();
  impl->address = address_;
  // accept_all() takes connections until EAGAIN: a blocking listener would hang the loop.
  int lfd = impl->listener->fd();
  RINGCC_SYSCHECK(::fcntl(lfd, F_SETFL, ::fcntl(lfd, F_GETFL, 0) | O_NONBLOCK), "ps listener O_NONBLOCK");
  if (has_restored_) {
    for (KeyState& ks : restored_) {
      Key& k = impl->keys[ks.id];
      k.id = ks.id;
      k.name = std::move(ks.name);
      k.numel = ks.numel;
      k.dtype = ks.dtype;
      k.version = ks.version;
      k.values = std::move(ks.values);
      k.momentum = std::move(ks.momentum);
    }
    restored_.clear();
    impl->fixed_keys = true;
  }
  impl_ = std::move(impl);
  running_ = true;
  thread_ = std::thread([this] {
    std::string err;
    try {
      impl_->loop();
    } catch (const std::exception& e) {
      err = e.what();
    }
    impl_->listener->close_now();
    {
      // From here the state is no longer touched by this thread; snapshot() reads it.
      std::lock_guard<std::mutex> lock(impl_->snap_mu);
      impl_->loop_exited = true;
    }
    impl_->snap_cv.notify_all();
    running_ = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      error_ = err;
      done_ = true;
    }
    done_cv_.notify_all();
  });
}

void Server::stop() {
  if (!impl_) return;
  impl_->stop_requested = true;
  char b = 1;
  (void)!::write(impl_->wake[1], &b, 1);
  if (thread_.joinable()) thread_.join();
}

bool Server::wait(double timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!impl_) return true;
  if (timeout < 0) {
    done_cv_.wait(lock, [&] { return done_; });
    return true;
  }
  return done_cv_.wait_for(lock, std::chrono::duration<double>(timeout), [&] { return done_; });
}

void Server::restore(std::vector<KeyState> keys) {
  RINGCC_CHECK_ARG(!impl_, "ps server: restore() must come before start()");
  std::set<uint64_t> ids;
  for (const KeyState& k : keys) {
    RINGCC_CHECK_ARG(ids.insert(k.id).second, "ps restore: key id ", k.id, " appears twice");
    RINGCC_CHECK_ARG(k.numel >= 1 && k.numel <= kMaxKeyElements, "ps restore: key '", k.name, "': numel ", k.numel,
                     " out of range");
    RINGCC_CHECK_ARG(k.dtype == DataType::kFloat32, "ps restore: key '", k.name, "': dtype ", dtype_name(k.dtype),
                     " (keys hold float32)");
    RINGCC_CHECK_ARG(k.name.size() <= kMaxNameBytes, "ps restore: key name longer than ", kMaxNameBytes);
    RINGCC_CHECK_ARG(k.values.size() == k.numel, "ps restore: key '", k.name, "': ", k.values.size(),
                     " values for numel ", k.numel);
    RINGCC_CHECK_ARG(k.momentum.empty() || k.momentum.size() == k.numel, "ps restore: key '", k.name, "': ",
                     k.momentum.size(), " momentum values for numel ", k.numel);
  }
  restored_ = std::move(keys);
  has_restored_ = true;
}

std::vector<KeyState> Server::snapshot() {
  RINGCC_CHECK_ARG(impl_, "ps server: snapshot() before start()");
  std::lock_guard<std::mutex> one(snap_call_mu_);
  Impl& im = *impl_;
  std::unique_lock<std::mutex> lock(im.snap_mu);
  if (im.loop_exited) return im.take_snapshot();
  im.snap_wanted = true;
  im.snap_ready = false;
  char b = 1;
  (void)!::write(im.wake[1], &b, 1);
  im.snap_cv.wait(lock, [&] { return im.snap_ready || im.loop_exited; });
  if (im.snap_ready) {
    im.snap_ready = false;
    return std::move(im.snap_out);
  }
  im.snap_wanted = false;
  return im.take_snapshot();  // the loop ended first; its state is final
}

std::string Server::error() const {
  std::lock_guard<std::mutex> lock(mu_);
  return error_;
}

}  // namespace ringcc::ps
