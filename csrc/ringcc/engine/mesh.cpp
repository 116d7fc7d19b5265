#include "ringcc/engine/mesh.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <sstream>

#include "ringcc/common/error.h"
#include "ringcc/transport/shm/shm_link.h"
#include "ringcc/transport/tcp/tcp_link.h"

namespace ringcc {
namespace {

using transport::Link;
using transport::LinkKind;

constexpr uint32_t kHelloMagic = 0x52434348;  // "RCCH"

// First message on every TCP connection, from the connecting (higher) rank.
struct Hello {
  uint32_t magic;
  uint16_t version;
  uint16_t stream;       // index of this connection among the pair's streams
  uint32_t from_rank;
  uint32_t to_rank;
  uint32_t world_size;
  uint32_t streams;
  uint64_t from_nonce;   // the connecting rank's nonce, as published in the store
};

struct PeerInfo {
  int rank = -1;
  std::string host, tcp, shm;
  int pid = 0;
  uint64_t nonce = 0;
  int streams = 1;
};

PeerInfo parse_info(const std::string& line, int expected_rank) {
  PeerInfo p;
  std::map<std::string, std::string> kv;
  std::stringstream ss(line);
  std::string item;
  while (std::getline(ss, item, ';')) {
    auto eq = item.find('=');
    if (eq != std::string::npos) kv[item.substr(0, eq)] = item.substr(eq + 1);
  }
  if (kv["v"] != "1" || kv.count("rank") == 0)
    RINGCC_THROW(PeerError, "rendezvous record of rank ", expected_rank,
                 " is not from a compatible ringcc version: '", line.substr(0, 80), "'");
  p.rank = std::stoi(kv["rank"]);
  if (p.rank != expected_rank)
    RINGCC_THROW(PeerError, "rendezvous record under rank ", expected_rank, " claims rank ", p.rank,
                 " (two communicators sharing one store prefix?)");
  p.host = kv["host"];
  p.tcp = kv["tcp"];
  p.shm = kv["shm"];
  p.pid = std::stoi(kv["pid"]);
  p.nonce = std::stoull(kv["nonce"], nullptr, 16);
  p.streams = std::stoi(kv["streams"]);
  return p;
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

}  // namespace

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
  std::random_device rd;
  nonce_ = (uint64_t(rd()) << 32) ^ rd();
  host_key_ = options_.host_id.empty() ? host_identity() : options_.host_id;
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
  return detail::concat("v=1;rank=", rank_, ";host=", host_key_, ";tcp=",
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
  if (peer == rank_ || !links_[peer]) return "self";
  return links_[peer]->kind() == LinkKind::kShm ? "shm" : "tcp";
}

void Mesh::connect(const std::vector<std::string>& infos, const Deadline& deadline) {
  RINGCC_CHECK_ARG(static_cast<int>(infos.size()) == size_, "expected ", size_,
                   " rendezvous records, got ", infos.size());
  if (size_ == 1) return;
  std::vector<PeerInfo> peers;
  for (int r = 0; r < size_; ++r) peers.push_back(parse_info(infos[r], r));
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

  // TCP: each rank dials the lower ranks and accepts the higher ones. Hellos to lower
  // ranks go out before accepting, and acks are read after, so nobody waits in a chain.
  const int streams = options_.tcp_streams;
  std::vector<std::vector<int>> fds(size_, std::vector<int>(streams, -1));
  for (int r = 0; r < rank_; ++r) {
    if (!use_tcp[r]) continue;
    for (int s = 0; s < streams; ++s) {
      int fd = transport::tcp::connect_to(peers[r].tcp, deadline, r);
      fds[r][s] = fd;
      Hello h{kHelloMagic, kProtocolVersion, static_cast<uint16_t>(s), static_cast<uint32_t>(rank_),
              static_cast<uint32_t>(r), static_cast<uint32_t>(size_), static_cast<uint32_t>(streams),
              nonce_};
      transport::tcp::send_all(fd, &h, sizeof(h), deadline, "sending the connection hello");
    }
  }
  int expected = 0;
  for (int r = rank_ + 1; r < size_; ++r) expected += use_tcp[r] ? streams : 0;
  while (expected > 0) {
    int fd = listener_->accept_one(deadline);
    Hello h{};
    std::string why;
    try {
      transport::tcp::recv_all(fd, &h, sizeof(h), deadline, "reading a connection hello");
      int from = static_cast<int>(h.from_rank);
      if (h.magic != kHelloMagic || h.version != kProtocolVersion) why = "not a ringcc hello";
      else if (static_cast<int>(h.to_rank) != rank_ || static_cast<int>(h.world_size) != size_)
        why = "addressed to another rank or communicator";
      else if (from <= rank_ || from >= size_ || !use_tcp[from]) why = "unexpected source rank";
      else if (h.from_nonce != peers[from].nonce) why = "nonce does not match the rendezvous record";
      else if (h.stream >= streams || fds[from][h.stream] >= 0) why = "bad or duplicate stream index";
    } catch (const Error& e) {
      why = e.what();
    }
    if (!why.empty()) {
      // A stray or stale connection must not break the job: log it and keep accepting.
      std::fprintf(stderr, "ringcc: rank %d rejected an incoming connection: %s\n", rank_, why.c_str());
      ::close(fd);
      continue;
    }
    uint32_t ack = kHelloMagic ^ static_cast<uint32_t>(rank_);
    transport::tcp::send_all(fd, &ack, sizeof(ack), deadline, "acknowledging a connection");
    fds[h.from_rank][h.stream] = fd;
    --expected;
  }
  for (int r = 0; r < rank_; ++r) {
    if (!use_tcp[r]) continue;
    for (int s = 0; s < streams; ++s) {
      uint32_t ack = 0;
      transport::tcp::recv_all(fds[r][s], &ack, sizeof(ack), deadline, "waiting for a connection ack");
      if (ack != (kHelloMagic ^ static_cast<uint32_t>(r)))
        RINGCC_THROW(PeerError, "rank ", rank_, ": the endpoint published for rank ", r,
                     " answered as someone else");
    }
  }
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

}  // namespace ringcc
