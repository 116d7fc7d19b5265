#include "ringcc/engine/mesh.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <list>
#include <map>
#include <sstream>

#include "ringcc/common/error.h"
#include "ringcc/common/hmac.h"
#include "ringcc/transport/shm/shm_link.h"
#include "ringcc/transport/tcp/tcp_link.h"

namespace ringcc {
namespace {

using transport::Link;
using transport::LinkKind;

// The TCP connection handshake (one per stream). The higher rank dials and says HELLO
// with a fresh random challenge; the acceptor answers with its own challenge and a proof,
// the dialler checks it and sends its proof, the acceptor checks that and acks:
//
//   dialler -> acceptor   Hello     (ranks, stream, world size, challenge_d)
//   acceptor -> dialler   Challenge (challenge_a, proof_a)
//   dialler -> acceptor   Proof     (proof_d)
//   acceptor -> dialler   ack       (kHelloMagic ^ acceptor rank)
//
// proof_x = HMAC-SHA256(job secret, kAuthContext || role x || transcript), the transcript
// being world size, streams, dialler rank, acceptor rank, stream, both ranks' nonces from
// the rendezvous records and both challenges. Each side's challenge is fresh, so a
// recorded handshake proves nothing on a new connection, and the secret (which only
// the rendezvous store holds) never crosses the socket. Fields are little endian.
constexpr uint32_t kHelloMagic = 0x52434348;      // "RCCH"
constexpr uint32_t kChallengeMagic = 0x52434343;  // "RCCC"
constexpr uint32_t kProofMagic = 0x52434350;      // "RCCP"
// Version of this handshake (not of the data frames): 3 = challenge-response.
constexpr uint16_t kHandshakeVersion = 3;
constexpr char kAuthContext[] = "ringcc-mesh-auth-v1";
constexpr size_t kChallengeBytes = 32;
// The "v=" of the rendezvous record; records of another version are refused by name.
constexpr const char* kRecordVersion = "2";

struct Hello {
  uint32_t magic;
  uint16_t version;
  uint16_t stream;       // index of this connection among the pair's streams
  uint32_t from_rank;
  uint32_t to_rank;
  uint32_t world_size;
  uint32_t streams;
  uint8_t challenge[kChallengeBytes];
};
struct Challenge {
  uint32_t magic;
  uint32_t from_rank;  // the acceptor
  uint8_t challenge[kChallengeBytes];
  uint8_t proof[auth::kDigestBytes];
};
struct Proof {
  uint32_t magic;
  uint8_t proof[auth::kDigestBytes];
};
static_assert(sizeof(Hello) == kMeshHelloBytes && sizeof(Challenge) == 72 && sizeof(Proof) == 36,
              "handshake messages have a fixed wire layout");

bool parse_hex64(const std::string& s, uint64_t* out) {
  if (s.empty() || s.size() > 16) return false;
  uint64_t v = 0;
  for (char c : s) {
    int d = c >= '0' && c <= '9'   ? c - '0'
            : c >= 'a' && c <= 'f' ? c - 'a' + 10
            : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                   : -1;
    if (d < 0) return false;
    v = (v << 4) | static_cast<uint64_t>(d);
  }
  *out = v;
  return true;
}

std::string read_first_line(const char* path) {
  std::ifstream f(path);
  std::string s;
  std::getline(f, s);
  return s;
}

std::string read_link(const char* path) {
  char buf[256];
  ssize_t n = readlink(path, buf, sizeof(buf) - 1);
  return n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string();
}

void put_le32(std::string* out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out->push_back(static_cast<char>(v >> (8 * i)));
}
void put_le64(std::string* out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out->push_back(static_cast<char>(v >> (8 * i)));
}

// proof = HMAC(secret, context || role || transcript); role 'A' (acceptor) or 'D' (dialler).
auth::Digest handshake_proof(const std::string& secret, char role, uint32_t world, uint32_t streams,
                             uint32_t dialler, uint32_t acceptor, uint32_t stream, uint64_t dialler_nonce,
                             uint64_t acceptor_nonce, const uint8_t* challenge_d, const uint8_t* challenge_a) {
  std::string m(kAuthContext, sizeof(kAuthContext) - 1);
  m.push_back(role);
  put_le32(&m, world);
  put_le32(&m, streams);
  put_le32(&m, dialler);
  put_le32(&m, acceptor);
  put_le32(&m, stream);
  put_le64(&m, dialler_nonce);
  put_le64(&m, acceptor_nonce);
  m.append(reinterpret_cast<const char*>(challenge_d), kChallengeBytes);
  m.append(reinterpret_cast<const char*>(challenge_a), kChallengeBytes);
  return auth::hmac_sha256(secret.data(), secret.size(), m.data(), m.size());
}

// The TCP connections of one rank's setup: dialled ones (to lower ranks) and accepted
// ones (from higher ranks), each a small state machine driven by one poll() loop.
// Accepted connections that fail their handshake, or do not finish it within the
// handshake bound, are logged and closed while the loop goes on; a dialled connection
// that fails throws, since its endpoint came from the rendezvous store.
class TcpSetup {
 public:
  TcpSetup(int rank, int size, const MeshOptions& options, std::vector<uint64_t> nonces,
           std::vector<bool> use_tcp, int listen_fd, const Deadline& deadline)
      : rank_(rank), size_(size), streams_(options.tcp_streams), secret_(options.secret),
        handshake_seconds_(options.handshake_timeout), nonces_(std::move(nonces)),
        use_tcp_(std::move(use_tcp)), listen_fd_(listen_fd), deadline_(deadline),
        fds_(size, std::vector<int>(options.tcp_streams, -1)) {
    for (int r = rank_ + 1; r < size_; ++r) expected_ += use_tcp_[r] ? streams_ : 0;
  }

  ~TcpSetup() {
    for (Conn& c : conns_)
      if (c.fd >= 0) ::close(c.fd);
    for (auto& row : fds_)
      for (int fd : row)
        if (fd >= 0) ::close(fd);
  }

  // Connects to `peer` and says HELLO (the rest happens in run()).
  void dial(int peer, int stream, const std::string& address) {
    Conn c;
    c.dialler = true;
    c.peer = peer;
    c.stream = stream;
    c.addr = address;
    c.fd = transport::tcp::connect_to(address, deadline_, peer);
    conns_.push_back(c);  // owns the fd from here
    Conn& p = conns_.back();
    auth::secure_random(p.mine, kChallengeBytes);
    Hello h{kHelloMagic, kHandshakeVersion, static_cast<uint16_t>(stream), static_cast<uint32_t>(rank_),
            static_cast<uint32_t>(peer), static_cast<uint32_t>(size_), static_cast<uint32_t>(streams_), {}};
    std::memcpy(h.challenge, p.mine, kChallengeBytes);
    if (std::string err = send_small(p, &h, sizeof(h)); !err.empty())
      RINGCC_THROW(PeerError, "rank ", rank_, ": sending the connection hello to rank ", peer, " at ", address,
                   " failed: ", err);
    p.stage = Stage::kChallenge;
    p.want = sizeof(Challenge);
  }

  // Runs every handshake to the end; returns the connected fds per [rank][stream].
  std::vector<std::vector<int>> run() {
    if (fcntl(listen_fd_, F_SETFL, fcntl(listen_fd_, F_GETFL, 0) | O_NONBLOCK) != 0)
      RINGCC_THROW(Error, "cannot make the listening socket non-blocking: ", detail::errno_string(errno));
    std::vector<pollfd> pfds;
    while (!finished()) {
      auto now = Clock::now();
      if (now >= deadline_.at) RINGCC_THROW(TimeoutError, "rank ", rank_, ": timed out after ", deadline_.seconds,
                                            " s setting up TCP connections; ", missing());
      Clock::time_point wake = deadline_.at;
      for (auto it = conns_.begin(); it != conns_.end();) {
        if (!it->dialler && it->expires <= now) {
          reject(*it, detail::concat("no complete handshake within ", handshake_seconds_,
                                     " s (RINGCC_HANDSHAKE_TIMEOUT)"));
          it = conns_.erase(it);
          continue;
        }
        if (!it->dialler) wake = std::min(wake, it->expires);
        ++it;
      }
      pfds.clear();
      pfds.push_back({listen_fd_, POLLIN, 0});
      for (const Conn& c : conns_) pfds.push_back({c.fd, POLLIN, 0});
      auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(wake - now).count() + 1;
      int rc = ::poll(pfds.data(), pfds.size(), static_cast<int>(std::clamp<int64_t>(ms, 0, 1000)));
      if (rc < 0 && errno != EINTR)
        RINGCC_THROW(Error, "poll failed during connection setup: ", detail::errno_string(errno));
      if (rc <= 0) continue;
      // Connections first, then the listener: accepting appends to conns_.
      size_t i = 1;
      for (auto it = conns_.begin(); it != conns_.end(); ++i) {
        if (pfds[i].revents == 0 || step(*it)) {
          ++it;
        } else {
          it = conns_.erase(it);  // rejected and closed, or handed over to fds_
        }
      }
      if (pfds[0].revents & POLLIN) accept_all();
    }
    // Setup is complete: whatever is still mid-handshake is a stray.
    for (Conn& c : conns_) reject(c, "setup finished before its handshake did");
    conns_.clear();
    auto out = std::move(fds_);
    fds_.clear();
    return out;
  }

 private:
  enum class Stage { kHello, kChallenge, kProof, kAck };
  struct Conn {
    int fd = -1;
    bool dialler = false;
    int peer = -1;  // dialler: the rank dialled; acceptor: known after a valid HELLO
    int stream = -1;
    std::string addr;
    Stage stage = Stage::kHello;
    uint8_t in[sizeof(Challenge)] = {};
    size_t got = 0, want = 0;
    uint8_t mine[kChallengeBytes] = {};
    uint8_t theirs[kChallengeBytes] = {};
    Clock::time_point expires;
  };
  static_assert(sizeof(Challenge) >= sizeof(Hello) && sizeof(Challenge) >= sizeof(Proof), "input buffer size");

  bool finished() const {
    if (accepted_ < expected_) return false;
    for (const Conn& c : conns_)
      if (c.dialler) return false;
    return true;
  }

  std::string missing() const {
    std::string dials, accepts;
    for (const Conn& c : conns_)
      if (c.dialler) dials += detail::concat(dials.empty() ? "" : ", ", c.peer, "/", c.stream);
    for (int r = rank_ + 1; r < size_; ++r)
      for (int s = 0; s < streams_ && use_tcp_[r]; ++s)
        if (fds_[r][s] < 0) accepts += detail::concat(accepts.empty() ? "" : ", ", r, "/", s);
    std::string out = "still waiting for";
    if (!accepts.empty()) out += " connections from rank/stream " + accepts;
    if (!dials.empty()) out += detail::concat(accepts.empty() ? "" : " and", " the handshake with rank/stream ", dials);
    return out;
  }

  // The handshake's messages are the first few dozen bytes on a fresh socket: they fit
  // in its send buffer, so a short write means the connection is broken.
  static std::string send_small(const Conn& c, const void* data, size_t n) {
    for (;;) {
      ssize_t k = ::send(c.fd, data, n, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (k == static_cast<ssize_t>(n)) return "";
      if (k < 0 && errno == EINTR) continue;
      return k < 0 ? detail::errno_string(errno) : "short write";
    }
  }

  void reject(Conn& c, const std::string& why) {
    // Nothing secret goes into the log: the address, and what was wrong.
    std::fprintf(stderr, "ringcc: rank %d rejected a connection from %s: %s\n", rank_, c.addr.c_str(), why.c_str());
    ::close(c.fd);
    c.fd = -1;
  }

  void accept_all() {
    for (;;) {
      int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (fd < 0) {
        if (errno == EINTR) continue;
        return;  // EAGAIN, or a connection that died before it was taken
      }
      Conn c;
      c.fd = fd;
      c.addr = transport::tcp::peer_address(fd);
      c.want = sizeof(Hello);
      c.expires = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                     std::chrono::duration<double>(handshake_seconds_));
      conns_.push_back(c);
      // A flood of strays must not exhaust descriptors: past the cap, the oldest
      // unfinished accepted connection goes.
      size_t accepted_pending = 0;
      for (const Conn& p : conns_) accepted_pending += p.dialler ? 0 : 1;
      if (accepted_pending > static_cast<size_t>(expected_ - accepted_) + kMaxStrays) {
        for (auto it = conns_.begin(); it != conns_.end(); ++it) {
          if (it->dialler) continue;
          reject(*it, "too many unauthenticated connections at once");
          conns_.erase(it);
          break;
        }
      }
    }
  }

  // Reads what is there; handles a complete message. False: the connection is finished
  // with (closed after a rejection, or handed over to fds_).
  bool step(Conn& c) {
    while (c.got < c.want) {
      ssize_t k = ::recv(c.fd, c.in + c.got, c.want - c.got, MSG_DONTWAIT);
      if (k > 0) {
        c.got += static_cast<size_t>(k);
        if (c.stage == Stage::kHello && c.got < sizeof(Hello)) {
          int from = -1, stream = -1;
          std::string bad = check_mesh_hello(c.in, c.got, rank_, size_, streams_, use_tcp_, &from, &stream);
          if (!bad.empty()) return fail(c, bad);
        }
        continue;
      }
      if (k < 0 && errno == EINTR) continue;
      if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return true;
      std::string why = k == 0 ? "the connection was closed" : detail::errno_string(errno);
      if (c.dialler)
        RINGCC_THROW(PeerError, "rank ", rank_, ": rank ", c.peer, " at ", c.addr, " closed the connection during ",
                     "the handshake (", why, "); did it reject this rank's proof of the job secret? See its log");
      return fail(c, why + " during the handshake");
    }
    c.got = 0;
    switch (c.stage) {
      case Stage::kHello: return on_hello(c);
      case Stage::kChallenge: return on_challenge(c);
      case Stage::kProof: return on_proof(c);
      case Stage::kAck: return on_ack(c);
    }
    return true;
  }

  bool fail(Conn& c, const std::string& why) {
    reject(c, why);
    return false;
  }

  auth::Digest proof(char role, const Conn& c) const {
    // The dialler is the higher rank of the pair, whichever side computes it.
    const bool d = c.dialler;
    uint32_t dialler = d ? rank_ : c.peer, acceptor = d ? c.peer : rank_;
    return handshake_proof(secret_, role, size_, streams_, dialler, acceptor, c.stream, nonces_[dialler],
                           nonces_[acceptor], d ? c.mine : c.theirs, d ? c.theirs : c.mine);
  }

  // Acceptor: a HELLO names the source and carries the dialler's challenge.
  bool on_hello(Conn& c) {
    int from = -1, stream = -1;
    if (std::string bad = check_mesh_hello(c.in, sizeof(Hello), rank_, size_, streams_, use_tcp_, &from, &stream);
        !bad.empty())
      return fail(c, bad);
    Hello h;
    std::memcpy(&h, c.in, sizeof(h));
    c.peer = from;
    c.stream = stream;
    std::memcpy(c.theirs, h.challenge, kChallengeBytes);
    auth::secure_random(c.mine, kChallengeBytes);
    Challenge ch{kChallengeMagic, static_cast<uint32_t>(rank_), {}, {}};
    std::memcpy(ch.challenge, c.mine, kChallengeBytes);
    auth::Digest p = proof('A', c);
    std::memcpy(ch.proof, p.data(), p.size());
    if (std::string err = send_small(c, &ch, sizeof(ch)); !err.empty())
      return fail(c, "sending the challenge failed: " + err);
    c.stage = Stage::kProof;
    c.want = sizeof(Proof);
    return true;
  }

  // Dialler: the acceptor proves it holds the secret and sends its challenge.
  bool on_challenge(Conn& c) {
    Challenge ch;
    std::memcpy(&ch, c.in, sizeof(ch));
    if (ch.magic != kChallengeMagic || static_cast<int>(ch.from_rank) != c.peer)
      RINGCC_THROW(PeerError, "rank ", rank_, ": the endpoint published for rank ", c.peer, " at ", c.addr,
                   " did not answer as rank ", c.peer, " of this communicator");
    std::memcpy(c.theirs, ch.challenge, kChallengeBytes);
    auth::Digest want = proof('A', c);
    if (!auth::constant_time_equal(want.data(), ch.proof, want.size()))
      RINGCC_THROW(PeerError, "rank ", rank_, ": the endpoint published for rank ", c.peer, " at ", c.addr,
                   " could not prove it knows this job's secret (a process of another job at that address?)");
    Proof pr{kProofMagic, {}};
    auth::Digest mine = proof('D', c);
    std::memcpy(pr.proof, mine.data(), mine.size());
    if (std::string err = send_small(c, &pr, sizeof(pr)); !err.empty())
      RINGCC_THROW(PeerError, "rank ", rank_, ": sending the handshake proof to rank ", c.peer, " at ", c.addr,
                   " failed: ", err);
    c.stage = Stage::kAck;
    c.want = sizeof(uint32_t);
    return true;
  }

  // Acceptor: the dialler's proof over both challenges; then the connection is the peer's.
  bool on_proof(Conn& c) {
    Proof pr;
    std::memcpy(&pr, c.in, sizeof(pr));
    auth::Digest want = proof('D', c);
    if (pr.magic != kProofMagic) return fail(c, "malformed handshake proof");
    if (!auth::constant_time_equal(want.data(), pr.proof, want.size()))
      return fail(c, detail::concat("wrong proof of the job secret for rank ", c.peer, " stream ", c.stream,
                                    " (forged, replayed, or from another job)"));
    if (fds_[c.peer][c.stream] >= 0)
      return fail(c, detail::concat("rank ", c.peer, " stream ", c.stream, " is already connected"));
    uint32_t ack = kHelloMagic ^ static_cast<uint32_t>(rank_);
    if (std::string err = send_small(c, &ack, sizeof(ack)); !err.empty())
      return fail(c, "acknowledging the connection failed: " + err);
    fds_[c.peer][c.stream] = c.fd;
    c.fd = -1;
    ++accepted_;
    return false;
  }

  bool on_ack(Conn& c) {
    uint32_t ack;
    std::memcpy(&ack, c.in, sizeof(ack));
    if (ack != (kHelloMagic ^ static_cast<uint32_t>(c.peer)))
      RINGCC_THROW(PeerError, "rank ", rank_, ": the endpoint published for rank ", c.peer, " at ", c.addr,
                   " sent a bad acknowledgement");
    fds_[c.peer][c.stream] = c.fd;
    c.fd = -1;
    return false;
  }

  static constexpr size_t kMaxStrays = 64;
  const int rank_, size_, streams_;
  const std::string& secret_;
  const double handshake_seconds_;
  const std::vector<uint64_t> nonces_;  // every rank's, from the records (own included)
  const std::vector<bool> use_tcp_;
  const int listen_fd_;
  const Deadline deadline_;
  std::vector<std::vector<int>> fds_;
  std::list<Conn> conns_;
  int expected_ = 0, accepted_ = 0;
};

}  // namespace

PeerInfo parse_rendezvous_record(const std::string& line, int expected_rank) {
  auto bad = [&](const std::string& why) {
    RINGCC_THROW(PeerError, "rendezvous record of rank ", expected_rank, " is malformed: ", why, " (record: '",
                 peer_text(line.substr(0, 120)), line.size() > 120 ? "...'" : "'",
                 "; another program writing under ringcc's store keys, or mixed ringcc versions?)");
  };
  if (line.size() > kMaxRecordBytes)
    bad(detail::concat(line.size(), " bytes, at most ", kMaxRecordBytes));
  static const char* const kFields[] = {"v", "rank", "host", "tcp", "shm", "pid", "nonce", "streams"};
  constexpr size_t kNumFields = sizeof(kFields) / sizeof(kFields[0]);
  std::string value[kNumFields];
  bool seen[kNumFields] = {};
  size_t pos = 0;
  while (pos <= line.size()) {
    size_t end = line.find(';', pos);
    if (end == std::string::npos) end = line.size();
    const std::string item = line.substr(pos, end - pos);
    pos = end + 1;
    if (item.empty()) continue;
    const size_t eq = item.find('=');
    if (eq == std::string::npos) bad("an item without '='");
    const std::string key = item.substr(0, eq);
    for (size_t f = 0; f < kNumFields; ++f) {
      if (key != kFields[f]) continue;
      if (seen[f]) bad(detail::concat("field '", key, "' appears twice"));
      seen[f] = true;
      value[f] = item.substr(eq + 1);
    }
    // Unknown fields are ignored; the version field says what must be there.
  }
  if (!seen[0] || value[0] != kRecordVersion)
    RINGCC_THROW(PeerError, "rendezvous record of rank ", expected_rank,
                 " is not from a compatible ringcc version: '", peer_text(line.substr(0, 80)), "'");
  for (size_t f = 1; f < kNumFields; ++f)
    if (!seen[f]) bad(detail::concat("field '", kFields[f], "' is missing"));
  PeerInfo p;
  uint64_t v = 0;
  if (!parse_decimal(value[1], 0, 0x7fffffff, &v)) bad("rank is not a rank number");
  p.rank = static_cast<int>(v);
  if (p.rank != expected_rank)
    RINGCC_THROW(PeerError, "rendezvous record under rank ", expected_rank, " claims rank ", p.rank,
                 " (two communicators sharing one store prefix?)");
  if (value[2].size() > kMaxHostKeyBytes)
    bad(detail::concat("host identity of ", value[2].size(), " bytes (at most ", kMaxHostKeyBytes, ")"));
  p.host = value[2];
  if (!value[3].empty()) {
    std::string host;
    int port = 0;
    try {
      transport::tcp::split_address(value[3], &host, &port);
    } catch (const std::invalid_argument& e) {
      bad(detail::concat("tcp endpoint: ", e.what()));
    }
  }
  p.tcp = value[3];
  if (!value[4].empty() && !transport::shm::is_ringcc_object_name(value[4], "/ringcc-", 255))
    bad("shm is not a ringcc shared-memory segment name");
  p.shm = value[4];
  if (!parse_decimal(value[5], 1, 0x7fffffff, &v)) bad("pid is not a process id");
  p.pid = static_cast<int>(v);
  if (!parse_hex64(value[6], &p.nonce)) bad("nonce is not 1..16 hex digits");
  if (!parse_decimal(value[7], 1, 64, &v)) bad("streams is not a number in 1..64");
  p.streams = static_cast<int>(v);
  return p;
}

std::string check_mesh_hello(const void* p, size_t n, int rank, int size, int streams,
                             const std::vector<bool>& use_tcp, int* from, int* stream) {
  Hello h{};
  std::memcpy(&h, p, std::min(n, sizeof(h)));
  if (n >= 6) {
    // Refuse what is plainly not a ringcc peer as soon as its first bytes show it.
    if (h.magic != kHelloMagic) return detail::concat("not a ringcc connection (first bytes 0x", std::hex, h.magic, ")");
    if (h.version != kHandshakeVersion)
      return detail::concat("handshake version ", h.version, ", expected ", kHandshakeVersion,
                            " (another ringcc version?)");
  }
  if (n < sizeof(h)) return "";
  if (h.to_rank != static_cast<uint32_t>(rank) || h.world_size != static_cast<uint32_t>(size) ||
      h.streams != static_cast<uint32_t>(streams))
    return detail::concat("addressed to rank ", h.to_rank, " of ", h.world_size, " with ", h.streams,
                          " stream(s); this is rank ", rank, " of ", size, " with ", streams, " (another communicator?)");
  if (h.from_rank <= static_cast<uint32_t>(rank) || h.from_rank >= static_cast<uint32_t>(size) ||
      h.from_rank >= use_tcp.size() || !use_tcp[h.from_rank])
    return detail::concat("claims to come from rank ", h.from_rank, ", which does not dial rank ", rank, " over TCP");
  if (h.stream >= static_cast<uint32_t>(streams)) return detail::concat("stream index ", h.stream, " of ", streams);
  *from = static_cast<int>(h.from_rank);
  *stream = h.stream;
  return "";
}

std::string host_identity() {
  char name[256] = {0};
  gethostname(name, sizeof(name) - 1);
  // Same boot, same IPC and mount namespaces (same /dev/shm): shared memory works.
  return std::string(name) + "/" + read_first_line("/proc/sys/kernel/random/boot_id") + "/" +
         read_link("/proc/self/ns/ipc") + "/" + read_link("/proc/self/ns/mnt");
}

Mesh::Mesh(int rank, int size, MeshOptions options)
    : rank_(rank), size_(size), options_(std::move(options)), links_(static_cast<size_t>(size)) {
  RINGCC_CHECK_ARG(size >= 1, "world size must be >= 1, got ", size);
  RINGCC_CHECK_ARG(rank >= 0 && rank < size, "rank ", rank, " is out of range for world size ", size);
  const std::string& t = options_.transport;
  RINGCC_CHECK_ARG(t == "auto" || t == "tcp" || t == "shm", "unknown transport '", t,
                   "' (expected auto, tcp or shm)");
  RINGCC_CHECK_ARG(options_.tcp_streams >= 1 && options_.tcp_streams <= 64,
                   "tcp_streams must be in 1..64, got ", options_.tcp_streams);
  RINGCC_CHECK_ARG(options_.handshake_timeout > 0, "handshake_timeout must be positive, got ",
                   options_.handshake_timeout);
  auth::secure_random(&nonce_, sizeof(nonce_));
  RINGCC_CHECK_ARG(options_.host_id.size() <= kMaxHostKeyBytes, "host_id must be at most ", kMaxHostKeyBytes,
                   " bytes, got ", options_.host_id.size());
  host_key_ = options_.host_id.empty() ? host_identity() : options_.host_id;
  if (host_key_.size() > kMaxHostKeyBytes) host_key_.resize(kMaxHostKeyBytes);
  for (char& c : host_key_)  // it travels inside a "key=value;..." record
    if (c == ';' || c == '=') c = '_';
  interrupt_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (size_ == 1) return;
  if (t != "tcp") segment_ = transport::shm::Segment::create(rank, size, options_.shm_ring_bytes);
  if (t != "shm")
    listener_ = std::make_unique<transport::tcp::Listener>(options_.listen_host,
                                                           size * options_.tcp_streams + 16);
}

Mesh::~Mesh() {
  links_.clear();
  if (interrupt_fd_ >= 0) ::close(interrupt_fd_);
}

std::string Mesh::local_info() const {
  char nonce[32];
  std::snprintf(nonce, sizeof(nonce), "%016llx", static_cast<unsigned long long>(nonce_));
  return detail::concat("v=", kRecordVersion, ";rank=", rank_, ";host=", host_key_, ";tcp=",
                        listener_ ? listener_->address() : "", ";shm=",
                        segment_ ? segment_->name() : "", ";pid=", getpid(), ";nonce=", nonce,
                        ";streams=", options_.tcp_streams);
}

int Mesh::local_ranks() const {
  int n = 1;
  for (const auto& l : links_) n += l && l->kind() == LinkKind::kShm ? 1 : 0;
  return n;
}

std::string Mesh::link_kind(int peer) const {
  if (!released_kinds_.empty()) return released_kinds_[peer];
  if (peer == rank_ || !links_[peer]) return "self";
  return links_[peer]->kind() == LinkKind::kShm ? "shm" : "tcp";
}

void Mesh::connect(const std::vector<std::string>& infos, const std::string& secret, const Deadline& deadline) {
  RINGCC_CHECK_ARG(static_cast<int>(infos.size()) == size_, "expected ", size_,
                   " rendezvous records, got ", infos.size());
  if (size_ == 1) return;
  RINGCC_CHECK_ARG(secret.size() >= 16 && secret.size() <= 1024, "the job secret must be 16..1024 bytes, got ",
                   secret.size(), " (ringcc.Communicator creates it in the rendezvous store)");
  options_.secret = secret;
  std::vector<PeerInfo> peers;
  for (int r = 0; r < size_; ++r) peers.push_back(parse_rendezvous_record(infos[r], r));
  const std::string& mode = options_.transport;

  std::vector<bool> use_tcp(size_, false);
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) continue;
    bool same_host = peers[r].host == host_key_ && !peers[r].shm.empty() && segment_;
    if (mode == "shm" && !same_host) {
      RINGCC_THROW(std::invalid_argument, "RINGCC_TRANSPORT=shm but rank ", r,
                   " is not on the same host as rank ", rank_,
                   " (or did not create shared memory); use tcp or auto");
    }
    use_tcp[r] = !same_host;
    if (use_tcp[r] && peers[r].tcp.empty())
      RINGCC_THROW(std::invalid_argument, "rank ", r, " is on another host but has no TCP endpoint",
                   " (RINGCC_TRANSPORT=shm there?)");
    if (use_tcp[r] && peers[r].streams != options_.tcp_streams)
      RINGCC_THROW(std::invalid_argument, "rank ", r, " uses ", peers[r].streams,
                   " TCP streams per peer but rank ", rank_, " uses ", options_.tcp_streams,
                   " (set RINGCC_TCP_STREAMS equally on all ranks)");
  }

  // Same host: map the peer's segment.
  for (int r = 0; r < size_; ++r) {
    if (r == rank_ || use_tcp[r]) continue;
    auto seg = transport::shm::Segment::open(peers[r].shm, r, size_);
    links_[r] = std::make_unique<transport::shm::ShmLink>(rank_, r, *segment_, std::move(seg));
  }

  // TCP: each rank dials the lower ranks and accepts the higher ones, and runs every
  // handshake, both sides, in one poll loop: nobody waits in a chain, and a stray
  // connection that stalls holds up nothing but its own slot.
  if (std::find(use_tcp.begin(), use_tcp.end(), true) == use_tcp.end()) return;
  std::vector<uint64_t> nonces;
  for (const PeerInfo& p : peers) nonces.push_back(p.nonce);
  nonces[rank_] = nonce_;
  TcpSetup setup(rank_, size_, options_, nonces, use_tcp, listener_->fd(), deadline);
  for (int r = 0; r < rank_; ++r) {
    if (!use_tcp[r]) continue;
    for (int s = 0; s < options_.tcp_streams; ++s) setup.dial(r, s, peers[r].tcp);
  }
  auto fds = setup.run();
  for (int r = 0; r < size_; ++r) {
    if (r == rank_ || !use_tcp[r]) continue;
    for (int fd : fds[r]) transport::tcp::configure_data_socket(fd);
    links_[r] = std::make_unique<transport::tcp::TcpLink>(rank_, r, fds[r], options_.tcp_stripe_bytes);
  }
}

void Mesh::finish_setup() {
  if (segment_) segment_->unlink();
  listener_.reset();
}

void Mesh::interrupt() {
  uint64_t one = 1;
  if (interrupt_fd_ >= 0) (void)!::write(interrupt_fd_, &one, sizeof(one));
  if (segment_) segment_->ring_doorbell();
}

void Mesh::send_control_frame(Link* link, FrameType type, AbortKind kind, const std::string& text) noexcept {
  if (link->mid_frame) return;  // cannot interleave; the peer will see EOF instead
  // Best effort, and it must not throw: it runs while failing or closing, often
  // towards a peer that is already gone (EPIPE).
  try {
    write_control_frame(link, type, kind, text);
  } catch (const std::exception&) {
    link->mid_frame = true;
  }
}

void Mesh::write_control_frame(Link* link, FrameType type, AbortKind kind, const std::string& text) {
  std::string body = text.substr(0, kMaxAbortText);
  FrameHeader h;
  h.type = type;
  h.abort_kind = kind;
  h.sender = static_cast<uint32_t>(rank_);
  h.payload_bytes = body.size();
  std::vector<char> buf(kFrameHeaderBytes + padded(body.size()), 0);
  std::memcpy(buf.data(), &h, sizeof(h));
  std::memcpy(buf.data() + kFrameHeaderBytes, body.data(), body.size());
  // Best effort within a short bound: a peer whose buffer is full is stuck or dead.
  Deadline d = Deadline::after(0.2);
  size_t off = 0;
  while (off < buf.size() && !d.expired()) off += link->write_some(buf.data() + off, buf.size() - off);
  link->mid_frame = off != 0 && off < buf.size();
}

void Mesh::abort(AbortKind kind, const std::string& reason) noexcept {
  if (ended_.exchange(true)) return;
  if (segment_) {
    auto* c = segment_->control();
    std::string r = reason.substr(0, kMaxAbortText - 1);
    std::memcpy(c->reason, r.c_str(), r.size() + 1);
    c->abort_kind = static_cast<uint32_t>(kind);
    c->state.store(transport::shm::kStateAborted, std::memory_order_release);
  }
  for (auto& l : links_) {
    if (!l) continue;
    if (l->kind() == LinkKind::kTcp) {
      send_control_frame(l.get(), FrameType::kAbort, kind, reason);
      static_cast<transport::tcp::TcpLink*>(l.get())->shutdown_write();
    }
  }
  for (auto& l : links_)  // wake peers blocked on their doorbell so they notice now
    if (l) l->wake_peer();
  interrupt();
}

void Mesh::close() noexcept {
  if (ended_.exchange(true)) return;
  if (segment_) segment_->control()->state.store(transport::shm::kStateClosed, std::memory_order_release);
  for (auto& l : links_) {
    if (l) l->wake_peer();
    if (!l || l->kind() != LinkKind::kTcp) continue;
    auto* t = static_cast<transport::tcp::TcpLink*>(l.get());
    send_control_frame(t, FrameType::kBye, AbortKind::kGeneric, "");
    t->shutdown_write();
    try {
      const void* p;
      while (size_t n = t->peek(&p)) t->consume(n);  // unread bytes would turn FIN into RST
    } catch (const std::exception&) {
      // A reset connection has nothing left to drain.
    }
  }
}

void Mesh::release() noexcept {
  if (!released_kinds_.empty()) return;
  std::vector<std::string> kinds;
  for (int p = 0; p < size_; ++p) kinds.push_back(link_kind(p));
  // A peer still sending to this rank has not read its goodbye or abort frame yet:
  // read on while it keeps sending, for at most half a second in all.
  Deadline bound = Deadline::after(0.5);
  for (auto& l : links_) {
    if (l && l->kind() == LinkKind::kTcp) static_cast<transport::tcp::TcpLink*>(l.get())->drain(bound);
    l.reset();
  }
  listener_.reset();
  released_kinds_ = std::move(kinds);
}

}  // namespace ringcc
