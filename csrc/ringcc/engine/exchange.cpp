#include "ringcc/engine/exchange.h"

#include <poll.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <sstream>

#include "ringcc/common/error.h"
#include "ringcc/kernels/cpu/kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define RINGCC_CPU_RELAX() _mm_pause()
#else
#define RINGCC_CPU_RELAX() ((void)0)
#endif

namespace ringcc {
namespace {

using transport::Link;
using transport::LinkKind;
using transport::PeerState;

enum Stage : uint8_t { kHeader = 0, kPayload, kPadding, kAbortText, kDone };

constexpr auto kBlockSlice = std::chrono::milliseconds(50);
const char kZeros[8] = {0};

// An abort frame from `peer` complete at the front of `n` readable bytes.
bool remote_abort_at(const void* p, size_t n, int peer, RemoteAbort* out) {
  return parse_abort_frame(p, n, static_cast<uint32_t>(peer), &out->kind, &out->text);
}

class Runner {
 public:
  Runner(OpContext& ctx, Transfer* t, size_t n, std::vector<Transfer>* grown = nullptr,
         TransferFeed* feed = nullptr)
      : ctx_(ctx), t_(t), n_(n), grown_(grown), feed_(feed), mesh_(*ctx.mesh), size_(mesh_.size()),
        queue_of_(2 * static_cast<size_t>(size_), -1), closed_seen_(size_), parked_(size_) {}

  void run();

 private:
  bool advance_send(Transfer& x);
  bool advance_recv(Transfer& x);
  void on_header(Transfer& x);
  void loop();
  std::string pending() const;
  const OpHeader* earlier_collective(const OpHeader& theirs) const;
  [[noreturn]] void fail_closed(const Transfer& x, bool mid_frame);
  [[noreturn]] void rethrow_with_abort_reason(Link* link);
  void check_peers();
  void block(uint32_t bell);
  void inspect_idle_tcp(Link* link);
  [[noreturn]] void timeout();
  std::string who() const { return detail::concat("rank ", mesh_.rank()); }
  bool has_pending_with(int peer) const;
  void add_transfers(size_t from);
  bool pull_more();
  const OpHeader& op_of(const Transfer& x) const { return x.op ? *x.op : ctx_.op; }
  // A send whose data is still arriving (Transfer::after) cannot start yet.
  bool ready(const Transfer& x) const { return x.after == 0 || t_[x.after - 1].stage == kDone; }

  // Transfers sharing a (peer, direction) use one byte stream, so only the first
  // unfinished one of each queue can move; a pass touches queue heads only.
  struct Queue {
    int peer;
    bool send;
    bool shm;  // over shared memory: worth spinning for
    std::vector<uint32_t> items;
    size_t head = 0;
    bool done() const { return head == items.size(); }
  };

  OpContext& ctx_;
  Transfer* t_;
  size_t n_;
  std::vector<Transfer>* grown_;  // with feed_: the vector t_ points into
  TransferFeed* feed_;
  Mesh& mesh_;
  int size_;
  std::vector<Queue> queues_;
  std::vector<int> queue_of_;  // (peer, direction) -> index in queues_
  std::vector<uint8_t> closed_seen_, parked_;
};

bool Runner::has_pending_with(int peer) const {
  for (const Queue& q : queues_)
    if (q.peer == peer && !q.done()) return true;
  return false;
}

bool Runner::advance_send(Transfer& x) {
  Link* link = mesh_.link(x.peer);
  bool moved = false;
  if (x.stage == kHeader) {
    link->mid_frame = true;
    size_t k = link->write_some(x.header + x.done, kFrameHeaderBytes - x.done);
    x.done += k;
    moved |= k > 0;
    if (x.done < kFrameHeaderBytes) return moved;
    x.stage = kPayload;
    x.done = 0;
  }
  if (x.stage == kPayload) {
    if (x.done < x.bytes) {
      size_t k = link->write_some(x.data + x.done, x.bytes - x.done);
      x.done += k;
      moved |= k > 0;
      if (x.done < x.bytes) return moved;
    }
    x.stage = kPadding;
    x.done = 0;
  }
  if (x.stage == kPadding) {
    size_t pad = padded(x.bytes) - x.bytes;
    if (x.done < pad) {
      size_t k = link->write_some(kZeros, pad - x.done);
      x.done += k;
      moved |= k > 0;
      if (x.done < pad) return moved;
    }
    x.stage = kDone;
    link->mid_frame = false;
    moved = true;
  }
  return moved;
}

// A send failed because the peer's connection is gone. If the peer aborted first, its
// abort frame (with the real reason) may be waiting unread in our inbound stream:
// report that instead of the broken pipe it caused.
void Runner::rethrow_with_abort_reason(Link* link) {
  if (link->kind() == LinkKind::kTcp) {
    const void* p = nullptr;
    size_t n = 0;
    try {
      n = link->peek(&p);
    } catch (const std::exception&) {
      n = 0;
    }
    RemoteAbort ra;
    if (remote_abort_at(p, n, link->peer(), &ra)) throw ra;
  }
  throw;
}

void Runner::fail_closed(const Transfer& x, bool mid_frame) {
  RINGCC_THROW(PeerError, who(), ": the connection from rank ", x.peer, " closed ",
               mid_frame ? "in the middle of a frame" : "without a goodbye", " during ",
               describe(op_of(x)), " (rank ", x.peer, " probably died or was killed)");
}

const OpHeader* Runner::earlier_collective(const OpHeader& theirs) const {
  if (!ctx_.history || theirs.kind == Collective::kSendRecv || theirs.kind == Collective::kConnect ||
      ctx_.op.kind == Collective::kSendRecv || theirs.seq >= ctx_.op.seq)
    return nullptr;
  return ctx_.history->find(theirs.seq);
}

void Runner::on_header(Transfer& x) {
  const OpHeader& expected = op_of(x);
  // Checked before anything is sized from it: a length past its cap is a protocol
  // violation by this peer, never an allocation or a wait for bytes that cannot come.
  const FrameHeader h = decode_frame_header(x.header);
  if (std::string bad = check_frame_header(h, static_cast<uint32_t>(x.peer)); !bad.empty())
    RINGCC_THROW(PeerError, who(), ": received a malformed frame from rank ", x.peer, " during ",
                 describe(expected), ": ", bad, " (protocol violation or version mismatch)");
  if (h.type == FrameType::kAbort) {
    x.stage = kAbortText;
    x.done = 0;
    x.abort_text.assign(static_cast<size_t>(padded(h.payload_bytes)), '\0');  // <= kMaxAbortText + 7
    x.bytes = static_cast<size_t>(h.payload_bytes);  // reused: text length
    return;
  }
  if (h.type == FrameType::kBye)
    RINGCC_THROW(PeerError, who(), ": rank ", x.peer, " closed its communicator while rank ",
                 mesh_.rank(), " was waiting for its data in ", describe(expected));
  if (h.type != FrameType::kData)
    RINGCC_THROW(PeerError, who(), ": unknown frame type from rank ", x.peer);
  std::string diff = differing_fields(h.op, expected);
  if (!diff.empty()) {
    const OpHeader* mine = earlier_collective(h.op);
    if (mine && !differing_fields(h.op, *mine).empty())
      RINGCC_THROW(MismatchError, who(), ": operation mismatch with rank ", x.peer, ": rank ", x.peer,
                   " called ", describe(h.op), " but rank ", mesh_.rank(), " called ", describe(*mine),
                   "; they differ in: ", differing_fields(h.op, *mine), " (noticed during ",
                   describe(expected), ")");
    RINGCC_THROW(MismatchError, who(), ": operation mismatch with rank ", x.peer, ": rank ", x.peer,
                 " called ", describe(h.op), " but rank ", mesh_.rank(), " called ",
                 describe(expected), "; they differ in: ", diff);
  }
  if (h.payload_bytes != x.bytes)
    RINGCC_THROW(MismatchError, who(), ": size mismatch with rank ", x.peer, " in ",
                 describe(expected), ": rank ", x.peer, " sent ", h.payload_bytes,
                 " bytes where rank ", mesh_.rank(), " expected ", x.bytes,
                 " (per-rank counts or splits differ between the ranks)");
  x.stage = kPayload;
  x.done = 0;
}

bool Runner::advance_recv(Transfer& x) {
  Link* link = mesh_.link(x.peer);
  bool moved = false;
  if (x.stage == kHeader) {
    size_t k = link->read_some(x.header + x.done, kFrameHeaderBytes - x.done);
    x.done += k;
    moved |= k > 0;
    if (x.done < kFrameHeaderBytes) {
      if (k == 0 && link->eof()) fail_closed(x, x.done > 0);
      return moved;
    }
    on_header(x);
  }
  if (x.stage == kAbortText) {
    size_t want = x.abort_text.size();
    size_t k = link->read_some(&x.abort_text[x.done], want - x.done);
    x.done += k;
    if (x.done < want) {
      if (k == 0 && link->eof()) fail_closed(x, true);
      return moved || k > 0;
    }
    const FrameHeader h = decode_frame_header(x.header);
    throw RemoteAbort{h.abort_kind, peer_text(x.abort_text.data(), x.bytes)};
  }
  if (x.stage == kPayload) {
    if (x.apply == Transfer::Apply::kCopy) {
      size_t k = x.done < x.bytes ? link->read_some(x.data + x.done, x.bytes - x.done) : 0;
      x.done += k;
      moved |= k > 0;
      if (x.done < x.bytes) {
        if (k == 0 && link->eof()) fail_closed(x, true);
        return moved;
      }
    } else {
      const size_t esize = element_size(ctx_.reduce_dtype);
      while (x.done < x.bytes) {
        const void* p = nullptr;
        size_t avail = link->peek(&p);
        size_t take = std::min(avail, x.bytes - x.done);
        take -= take % esize;
        if (take == 0) {
          if (avail == 0 && link->eof()) fail_closed(x, true);
          break;
        }
        char* dst = x.data + x.done;
        const char* local = x.operand ? x.operand + x.done : dst;
        if (x.incoming_first) kernels::reduce(dst, p, local, take / esize, ctx_.reduce_dtype, ctx_.reduce_op);
        else kernels::reduce(dst, local, p, take / esize, ctx_.reduce_dtype, ctx_.reduce_op);
        link->consume(take);
        x.done += take;
        moved = true;
      }
      if (x.done < x.bytes) return moved;
    }
    x.stage = kPadding;
    x.done = 0;
  }
  if (x.stage == kPadding) {
    size_t pad = padded(x.bytes) - x.bytes;
    char sink[8];
    if (x.done < pad) {
      size_t k = link->read_some(sink, pad - x.done);
      x.done += k;
      if (x.done < pad) {
        if (k == 0 && link->eof()) fail_closed(x, true);
        return moved || k > 0;
      }
    }
    x.stage = kDone;
    moved = true;
  }
  return moved;
}

// Out-of-band peer checks: shared-memory state words and pids. TCP peers report
// through the stream (EOF, abort frames), handled in advance_recv / inspect_idle_tcp.
void Runner::check_peers() {
  for (int p = 0; p < size_; ++p) {
    Link* link = p == mesh_.rank() ? nullptr : mesh_.link(p);
    if (!link || link->kind() != LinkKind::kShm) continue;
    switch (link->peer_state()) {
      case PeerState::kAlive: break;
      case PeerState::kAborted: {
        AbortKind kind = AbortKind::kGeneric;
        std::string text = link->peer_abort(&kind);
        throw RemoteAbort{kind, text};
      }
      case PeerState::kDead:
        RINGCC_THROW(PeerError, who(), ": rank ", p, " died (its process exited without closing the ",
                     "communicator) during ", describe(ctx_.op));
      case PeerState::kClosed:
        // Its last bytes were published before the state word, so a transfer that
        // still cannot progress after one more pass never will.
        if (has_pending_with(p)) {
          if (closed_seen_[p])
            RINGCC_THROW(PeerError, who(), ": rank ", p, " closed its communicator while rank ",
                         mesh_.rank(), " still needed it in ", describe(ctx_.op));
          closed_seen_[p] = 1;
        }
        break;
    }
  }
}

void Runner::inspect_idle_tcp(Link* link) {
  const void* p = nullptr;
  size_t n = link->peek(&p);
  if (n >= kFrameHeaderBytes) {
    RemoteAbort ra;
    if (remote_abort_at(p, n, link->peer(), &ra)) throw ra;
    const FrameHeader h = decode_frame_header(p);
    if (h.type == FrameType::kAbort && check_frame_header(h, static_cast<uint32_t>(link->peer())).empty())
      return;  // an abort whose text is still in flight
    // Data of a later operation, a goodbye, or garbage: not ours to read now; the
    // receive that reaches it checks the header.
    parked_[link->peer()] = 1;
    return;
  }
  if (link->eof()) {
    if (n == 0)
      RINGCC_THROW(PeerError, who(), ": rank ", link->peer(), " closed its connection without a goodbye",
                   " during ", describe(ctx_.op), " (rank ", link->peer(), " probably died or was killed)");
    parked_[link->peer()] = 1;
  }
}

void Runner::block(uint32_t bell) {
  std::vector<pollfd> fds;
  std::vector<Link*> idle;
  bool shm_pending = false;
  std::vector<uint8_t> has_recv(size_, 0);
  for (const Queue& q : queues_) {
    if (q.done()) continue;
    if (q.send && !ready(t_[q.items[q.head]])) continue;  // waits for a receive, polled below
    Link* link = mesh_.link(q.peer);
    if (!q.send) has_recv[q.peer] = 1;
    if (link->kind() == LinkKind::kShm) {
      shm_pending = true;
      continue;
    }
    fds.push_back(pollfd{link->poll_fd(q.send), static_cast<short>(q.send ? POLLOUT : POLLIN), 0});
  }
  size_t first_idle = fds.size();
  for (int p = 0; p < size_; ++p) {
    if (p == mesh_.rank() || has_recv[p] || parked_[p]) continue;
    Link* link = mesh_.link(p);
    if (link && link->kind() == LinkKind::kTcp) {
      idle.push_back(link);
      fds.push_back(pollfd{link->poll_fd(false), POLLIN, 0});
    }
  }
  auto slice = ctx_.deadline.remaining(kBlockSlice);
  auto* own = mesh_.own_control();
  bool tcp_pending = first_idle > 0;
  // Sleep on the futex only when no socket needs watching: in a mixed mesh an idle TCP
  // peer may send an abort frame, which only poll() would see.
  if (!tcp_pending && idle.empty() && own) {
    transport::shm::wait_doorbell(own, bell, static_cast<long>(slice.count()));
    return;
  }
  fds.push_back(pollfd{mesh_.interrupt_fd(), POLLIN, 0});
  int ms = shm_pending ? 1 : static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(slice).count()) + 1;
  int rc = ::poll(fds.data(), fds.size(), ms);
  if (rc <= 0) return;
  for (size_t i = 0; i < idle.size(); ++i)
    if (fds[first_idle + i].revents) inspect_idle_tcp(idle[i]);
  if (fds.back().revents) {
    uint64_t v;
    (void)!::read(mesh_.interrupt_fd(), &v, sizeof(v));
  }
}

// "to send 4096 bytes to rank 1 (nothing accepted yet); to receive ..." for every
// unfinished queue: what this rank is still waiting for.
std::string Runner::pending() const {
  std::ostringstream os;
  const char* sep = " ";
  for (const Queue& q : queues_) {
    if (q.done()) continue;
    const Transfer& x = t_[q.items[q.head]];
    bool s = q.send;
    if (x.stage == kAbortText) {  // x.bytes now counts the text
      os << sep << "to receive from rank " << x.peer << " (an abort message came instead of data)";
      sep = "; ";
      continue;
    }
    os << sep << (s ? "to send " : "to receive ") << x.bytes << " bytes " << (s ? "to" : "from")
       << " rank " << x.peer;
    if (x.op) os << " for " << describe(*x.op);
    if (s && !ready(x))  // not this peer's fault: the data to forward has not come in
      os << " (once the data from rank " << t_[x.after - 1].peer << " has arrived)";
    else if (x.stage == kHeader && x.done == 0)
      os << " (nothing " << (s ? "accepted" : "arrived") << " yet)";
    sep = "; ";
  }
  return os.str();
}

void Runner::timeout() {
  throw TimeoutError(detail::concat(who(), ": ", describe(ctx_.op), " timed out after ", ctx_.deadline.seconds,
                                    " s; still waiting", pending(),
                                    " (is a rank stuck, dead, or calling a different operation?)"));
}

void Runner::add_transfers(size_t from) {
  for (size_t i = from; i < n_; ++i) {
    Transfer& x = t_[i];
    x.stage = kHeader;
    x.done = 0;
    RINGCC_ASSERT(x.peer >= 0 && x.peer < size_ && x.peer != mesh_.rank());
    bool is_send = x.dir == Transfer::Dir::kSend;
    int& qi = queue_of_[2 * x.peer + (is_send ? 1 : 0)];
    if (qi < 0) {
      qi = static_cast<int>(queues_.size());
      queues_.push_back(Queue{x.peer, is_send, mesh_.link(x.peer)->kind() == LinkKind::kShm, {}, 0});
    }
    queues_[qi].items.push_back(static_cast<uint32_t>(i));
    if (x.dir == Transfer::Dir::kSend) {
      FrameHeader h;
      h.sender = static_cast<uint32_t>(mesh_.rank());
      h.payload_bytes = x.bytes;
      h.op = op_of(x);
      std::memset(x.header, 0, sizeof(x.header));
      std::memcpy(x.header, &h, sizeof(h));
    }
  }
}

// Transfers of operations queued since the last look join the exchange.
bool Runner::pull_more() {
  if (!feed_ || !feed_->pull(*grown_)) return false;
  size_t before = n_;
  t_ = grown_->data();  // the vector may have moved; only indices are kept across passes
  n_ = grown_->size();
  add_transfers(before);
  return n_ > before;
}

void Runner::run() {
  try {
    loop();
  } catch (RemoteAbort& ra) {
    // Another rank timed out first; its text names what *it* waited for, which may be a
    // healthy rank one hop away from the culprit. Add this rank's own view.
    if (ra.kind == AbortKind::kTimeout) {
      const std::string mine = pending();
      ra.text += detail::concat(" [when it reached rank ", mesh_.rank(), ", rank ", mesh_.rank(), " was still waiting",
                                mine.empty() ? " for nothing in this operation" : mine, "]");
    }
    throw;
  }
}

void Runner::loop() {
  add_transfers(0);
  auto* own = mesh_.own_control();
  auto spin = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(ctx_.spin_seconds));
  Clock::time_point idle_since = Clock::now();
  for (;;) {
    uint32_t bell = own ? own->doorbell.load(std::memory_order_acquire) : 0;
    bool progress = false, all_done = true, shm_pending = false;
    for (Queue& q : queues_) {
      while (!q.done()) {
        Transfer& x = t_[q.items[q.head]];
        if (q.send) {
          if (!ready(x)) break;
          try {
            progress |= advance_send(x);
          } catch (const PeerError&) {
            rethrow_with_abort_reason(mesh_.link(q.peer));
          }
        } else {
          progress |= advance_recv(x);
        }
        if (x.stage != kDone) break;
        ++q.head;
        if (x.on_done) x.on_done();
        if (feed_) feed_->completed(q.items[q.head - 1]);
      }
      all_done &= q.done();
      shm_pending |= q.shm && !q.done();
    }
    // Idle or finished: operations queued meanwhile may join (point-to-point batches).
    if ((all_done || !progress) && pull_more()) progress = true;
    else if (all_done) return;
    Clock::time_point now = Clock::now();
    if (progress) {
      idle_since = now;
      continue;
    }
    if (ctx_.interrupted && ctx_.interrupted->load(std::memory_order_relaxed))
      RINGCC_THROW(AbortedError, who(), ": the communicator was aborted during ", describe(ctx_.op));
    if (now >= ctx_.deadline.at) timeout();
    // Spin only for a shared-memory peer, which answers within microseconds when it is
    // running. A TCP peer's data takes a network round trip, and spinning for it would
    // take the CPU from the kernel's network stack (or from co-located ranks).
    if (shm_pending && now - idle_since < spin) {
      if (ctx_.yield_while_spinning) sched_yield();
      else RINGCC_CPU_RELAX();
      continue;
    }
    check_peers();
    block(bell);
  }
}

}  // namespace

Transfer Transfer::send(int peer, const void* data, size_t bytes) {
  Transfer t;
  t.dir = Dir::kSend;
  t.peer = peer;
  t.data = const_cast<char*>(static_cast<const char*>(data));
  t.bytes = bytes;
  return t;
}

Transfer Transfer::recv(int peer, void* data, size_t bytes) {
  Transfer t;
  t.dir = Dir::kRecv;
  t.peer = peer;
  t.data = static_cast<char*>(data);
  t.bytes = bytes;
  return t;
}

Transfer Transfer::recv_reduce(int peer, void* data, size_t bytes, bool incoming_first) {
  Transfer t = recv(peer, data, bytes);
  t.apply = Apply::kReduce;
  t.incoming_first = incoming_first;
  return t;
}

void OpContext::exchange(Transfer* transfers, size_t n) {
  if (n == 0) return;
  Runner(*this, transfers, n).run();
}

void OpContext::exchange(std::vector<Transfer>& transfers, TransferFeed& feed) {
  Runner(*this, transfers.data(), transfers.size(), &transfers, &feed).run();
}

}  // namespace ringcc
