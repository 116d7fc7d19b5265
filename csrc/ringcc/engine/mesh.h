// The set of links from one rank to every peer, chosen per peer pair:
// shared memory when both ranks are on the same host, TCP otherwise
// (RINGCC_TRANSPORT=tcp|shm|auto overrides the choice).
#pragma once

#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "ringcc/common/clock.h"
#include "ringcc/engine/protocol.h"
#include "ringcc/transport/link.h"
#include "ringcc/transport/shm/shm_segment.h"
#include "ringcc/transport/tcp/socket.h"

namespace ringcc {

struct MeshOptions {
  std::string transport = "auto";    // auto | tcp | shm
  std::string listen_host;           // numeric IP to listen on for TCP
  size_t shm_ring_bytes = 1 << 20;   // per directed pair
  int tcp_streams = 1;               // TCP connections per peer
  size_t tcp_stripe_bytes = 256 << 10;
  // Overrides host detection (ranks with equal ids use shared memory); empty = detect.
  std::string host_id;
  // The job's shared secret (given to connect()): every TCP connection proves it
  // knows it with an HMAC over fresh challenges; it never travels itself.
  std::string secret;
  // Seconds an accepted connection may take to complete its handshake before it is
  // dropped as a stray (it never holds up the others: all are handled at once).
  double handshake_timeout = 10.0;
};

class Mesh {
 public:
  // Creates this rank's endpoints (listening socket and/or shared-memory segment).
  Mesh(int rank, int size, MeshOptions options);
  ~Mesh();

  // Everything a peer needs to reach this rank, as one line of text for the store.
  std::string local_info() const;
  // Connects to every peer from their local_info() lines (index = rank); every TCP
  // connection proves, both ways, that its ends know `secret` (the job's, 16..1024 bytes).
  void connect(const std::vector<std::string>& infos, const std::string& secret, const Deadline& deadline);
  // Called once every rank has connected (after the setup barrier): removes the
  // shared-memory name and closes the listener.
  void finish_setup();

  int rank() const { return rank_; }
  int size() const { return size_; }
  transport::Link* link(int peer) const { return links_[peer].get(); }
  // Ranks of this communicator on this host, this one included.
  int local_ranks() const;
  // "shm" / "tcp" per peer, for info and tests.
  std::string link_kind(int peer) const;

  // Blocking support for the exchanger.
  transport::shm::ControlBlock* own_control() const {
    return segment_ ? segment_->control() : nullptr;
  }
  int interrupt_fd() const { return interrupt_fd_; }
  // Wakes a progress thread blocked in poll()/futex (abort from another thread).
  void interrupt();

  // Tells every peer this communicator is dead, with the reason (best effort, bounded,
  // never throws: peers may already be gone).
  void abort(AbortKind kind, const std::string& reason) noexcept;
  // Tells every peer this rank will send nothing more (never throws).
  void close() noexcept;
  // After close() or abort(), once no operation can run: closes the sockets (unread
  // bytes drained first, so peers see an orderly end) and unmaps the peers' segments.
  // link_kind() still answers; link() returns nullptr. Never throws.
  void release() noexcept;

 private:
  void send_control_frame(transport::Link* link, FrameType type, AbortKind kind,
                          const std::string& text) noexcept;
  void write_control_frame(transport::Link* link, FrameType type, AbortKind kind,
                           const std::string& text);

  const int rank_, size_;
  MeshOptions options_;
  uint64_t nonce_;
  std::string host_key_;
  std::optional<transport::shm::Segment> segment_;
  std::unique_ptr<transport::tcp::Listener> listener_;
  std::vector<std::unique_ptr<transport::Link>> links_;
  std::vector<std::string> released_kinds_;  // link_kind() per peer after release()
  int interrupt_fd_ = -1;
  std::atomic<bool> ended_{false};
};

// Identity of "this host" for transport choice: ranks with equal keys share memory.
std::string host_identity();

// One rank's rendezvous record, as Mesh::local_info() writes it and the store gives it
// back: "v=2;rank=R;host=H;tcp=A;shm=S;pid=P;nonce=N;streams=K".
struct PeerInfo {
  int rank = -1;
  std::string host, tcp, shm;
  int pid = 0;
  uint64_t nonce = 0;
  int streams = 1;
};
constexpr size_t kMaxRecordBytes = 16 << 10;  // a whole record
constexpr size_t kMaxHostKeyBytes = 1024;      // its host= field (host_id= / RINGCC_HOST_ID)
// Parses the record read from the store under `expected_rank`, bounding every field
// before it is used: the whole record (kMaxRecordBytes), each field present exactly
// once, rank equal to expected_rank, host at most kMaxHostKeyBytes, tcp empty or a
// "host:port" with port 1..65535, shm empty or a ringcc segment name, pid 1..2^31-1,
// nonce 1..16 hex digits, streams 1..64. Throws PeerError naming the rank and the field.
PeerInfo parse_rendezvous_record(const std::string& line, int expected_rank);

// The acceptor's view of a connection HELLO of the TCP handshake (mesh.cpp), given the
// first `n` bytes received so far. Returns "" while they are a plausible prefix (the
// magic and version are checked as soon as 6 bytes are in), and, once all
// kMeshHelloBytes are in, "" with *from / *stream set when the HELLO is addressed to
// `rank` of a `size`-rank mesh with `streams` streams from a higher rank that dials it
// over TCP (use_tcp[from]); otherwise why the connection is refused.
constexpr size_t kMeshHelloBytes = 56;
std::string check_mesh_hello(const void* p, size_t n, int rank, int size, int streams,
                             const std::vector<bool>& use_tcp, int* from, int* stream);

}  // namespace ringcc
