#include "ringcc/engine/communicator.h"

#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "ringcc/common/error.h"
#include "ringcc/transport/shm/shm_segment.h"

namespace ringcc {
namespace {

uint64_t hash_counts(const std::vector<size_t>& counts) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (size_t c : counts) {
    for (int b = 0; b < 8; ++b) {
      h ^= (static_cast<uint64_t>(c) >> (8 * b)) & 0xff;
      h *= 1099511628211ull;
    }
  }
  return h | 1;  // never 0, which means "no counts"
}

size_t sum(const std::vector<size_t>& v) {
  size_t s = 0;
  for (size_t x : v) s += x;
  return s;
}

bool overlaps(const void* a, size_t an, const void* b, size_t bn) {
  auto pa = reinterpret_cast<uintptr_t>(a), pb = reinterpret_cast<uintptr_t>(b);
  return an && bn && pa < pb + bn && pb < pa + an;
}

// The deadline of one operation: its own timeout, or the communicator's (< 0 in OpDesc).
Deadline deadline_for(const OpDesc& d, double communicator_timeout) {
  return Deadline::after(d.timeout_seconds > 0 ? d.timeout_seconds : communicator_timeout);
}

bool is_rooted(Collective c) {
  return c == Collective::kBroadcast || c == Collective::kReduce || c == Collective::kGather ||
         c == Collective::kScatter;
}

std::exception_ptr make_error(AbortKind kind, const std::string& text) {
  switch (kind) {
    case AbortKind::kTimeout: return std::make_exception_ptr(TimeoutError(text));
    case AbortKind::kPeer: return std::make_exception_ptr(PeerError(text));
    case AbortKind::kMismatch: return std::make_exception_ptr(MismatchError(text));
    case AbortKind::kUser: return std::make_exception_ptr(AbortedError(text));
    case AbortKind::kGeneric: break;
  }
  return std::make_exception_ptr(Error(text));
}

}  // namespace

const char* algorithm_name(Algorithm a) {
  switch (a) {
    case Algorithm::kAuto: return "auto";
    case Algorithm::kRing: return "ring";
    case Algorithm::kRecursiveDoubling: return "recursive_doubling";
  }
  return "unknown";
}

Communicator::Communicator(int rank, int size, CommOptions options)
    : rank_(rank), size_(size), options_(std::move(options)), mesh_(rank, size, options_.mesh),
      send_seq_(static_cast<size_t>(size), 0), recv_seq_(static_cast<size_t>(size), 0) {
  RINGCC_CHECK_ARG(options_.timeout_seconds > 0, "timeout must be positive, got ", options_.timeout_seconds);
  RINGCC_CHECK_ARG(options_.segment_bytes > 0, "segment_bytes must be positive");
}

Communicator::~Communicator() {
  try {
    close();
  } catch (...) {
    // Destructors must not throw; close() already recorded what went wrong.
  }
}

void Communicator::connect(const std::vector<std::string>& infos, const std::string& secret) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    RINGCC_CHECK_ARG(!connected_, "communicator is already connected");
  }
  Deadline deadline = Deadline::after(options_.timeout_seconds);
  try {
    mesh_.connect(infos, secret, deadline);
    // Nobody may remove its shared-memory name before every peer has mapped it.
    OpHeader setup;
    setup.kind = Collective::kConnect;
    OpContext ctx = make_context(setup, deadline);
    algorithms::barrier(ctx);
  } catch (...) {
    setup_failed(infos, std::current_exception());
  }
  mesh_.finish_setup();
  cpu_set_t cpus;
  int ncpu = sched_getaffinity(0, sizeof(cpus), &cpus) == 0 ? CPU_COUNT(&cpus) : 1;
  oversubscribed_ = mesh_.local_ranks() > ncpu;
  std::lock_guard<std::mutex> lock(mu_);
  connected_ = true;
  thread_ = std::thread([this] { progress_loop(); });
}

void Communicator::validate(const OpDesc& d) const {
  const char* name = collective_name(d.kind);
  const int n = size_, r = rank_;
  const size_t es = element_size(d.dtype);
  RINGCC_CHECK_ARG(es != 0, name, ": invalid dtype code ", static_cast<int>(d.dtype));
  if (d.has_op) {
    if (!op_supported(d.dtype, d.op)) {
      const char* why = d.op == ReduceOp::kAvg ? " (avg needs a floating dtype: use sum and divide)"
                                               : " (bitwise ops need an integer or bool dtype)";
      RINGCC_THROW(DtypeError, name, ": op '", reduce_op_name(d.op), "' is not supported for dtype ",
                   dtype_name(d.dtype), why);
    }
  }
  if (d.compression != Compression::kNone) {
    const char* c = compression_name(d.compression);
    RINGCC_CHECK_ARG(d.kind == Collective::kAllreduce, name, ": rank ", r, ": compression ", c,
                     " is only available for allreduce");
    if (d.dtype != DataType::kFloat32)
      RINGCC_THROW(DtypeError, name, ": rank ", r, ": compression ", c, " needs float32 data, got ",
                   dtype_name(d.dtype), " (compress gradients before casting them)");
    if (!d.has_op || (d.op != ReduceOp::kSum && d.op != ReduceOp::kAvg))
      RINGCC_THROW(DtypeError, name, ": rank ", r, ": compression ", c, " supports op sum or avg, not ",
                   d.has_op ? reduce_op_name(d.op) : "none");
  }
  const bool rooted = is_rooted(d.kind);
  if (rooted)
    RINGCC_CHECK_ARG(d.root >= 0 && d.root < n, name, ": root ", d.root, " is out of range for ", n, " ranks");
  if (d.kind == Collective::kSendRecv)
    RINGCC_CHECK_ARG(d.peer >= 0 && d.peer < n && d.peer != r, name, ": peer ", d.peer,
                     " is invalid for rank ", r, " of ", n, " ranks");
  bool vector_counts = d.kind == Collective::kAllgatherV || d.kind == Collective::kReduceScatter ||
                       d.kind == Collective::kAlltoallV;
  if (vector_counts)
    RINGCC_CHECK_ARG(d.counts.size() == static_cast<size_t>(n), name, ": expected ", n,
                     " per-rank counts, got ", d.counts.size());
  if (d.kind == Collective::kAlltoallV) {
    RINGCC_CHECK_ARG(d.recv_counts.size() == static_cast<size_t>(n), name, ": expected ", n,
                     " receive counts, got ", d.recv_counts.size());
    RINGCC_CHECK_ARG(d.counts[r] == d.recv_counts[r], name, ": rank ", r, " sends ", d.counts[r],
                     " elements to itself but expects to receive ", d.recv_counts[r]);
  }

  // Required buffer sizes in elements (-1: buffer unused on this rank).
  const size_t kUnused = ~size_t(0);
  size_t need_in = kUnused, need_out = kUnused;
  switch (d.kind) {
    case Collective::kAllreduce: need_in = need_out = d.count; break;
    case Collective::kBroadcast: need_out = d.count; if (r == d.root && d.in) need_in = d.count; break;
    case Collective::kAllgather: need_in = d.count; need_out = d.count * n; break;
    case Collective::kAllgatherV: need_in = d.counts[r]; need_out = sum(d.counts); break;
    case Collective::kReduceScatter: need_in = sum(d.counts); need_out = d.counts[r]; break;
    case Collective::kReduce: need_in = d.count; if (r == d.root) need_out = d.count; break;
    case Collective::kGather: need_in = d.count; if (r == d.root) need_out = d.count * n; break;
    case Collective::kScatter: need_out = d.count; if (r == d.root) need_in = d.count * n; break;
    case Collective::kAlltoall: need_in = need_out = d.count * n; break;
    case Collective::kAlltoallV: need_in = sum(d.counts); need_out = sum(d.recv_counts); break;
    case Collective::kBarrier: break;
    case Collective::kSendRecv: (d.is_send ? need_in : need_out) = d.count; break;
    case Collective::kConnect: RINGCC_THROW(std::invalid_argument, "connect is not a user operation");
  }
  auto check = [&](const char* which, const void* p, size_t bytes, size_t need) {
    if (need == kUnused) return;
    RINGCC_CHECK_ARG(p != nullptr || need == 0, name, ": rank ", r, " passed no ", which, " buffer");
    RINGCC_CHECK_ARG(bytes == need * es, name, ": rank ", r, ": ", which, " buffer has ", bytes,
                     " bytes but needs ", need * es, " (", need, " ", dtype_name(d.dtype),
                     " elements for ", n, " ranks)");
  };
  check("input", d.in, d.in_bytes, need_in);
  check("output", d.out, d.out_bytes, need_out);

  // In-place forms are the documented aliases; any other overlap would corrupt data.
  if (need_in != kUnused && need_out != kUnused && overlaps(d.in, d.in_bytes, d.out, d.out_bytes)) {
    const char* in = static_cast<const char*>(d.in);
    const char* out = static_cast<const char*>(d.out);
    bool ok = false;
    switch (d.kind) {
      case Collective::kAllreduce:
      case Collective::kBroadcast:
      case Collective::kReduce: ok = in == out; break;
      case Collective::kAllgather: ok = in == out + r * d.count * es; break;
      case Collective::kAllgatherV: {
        size_t off = 0;
        for (int c = 0; c < r; ++c) off += d.counts[c];
        ok = in == out + off * es;
        break;
      }
      case Collective::kGather: ok = in == out + r * d.count * es; break;
      case Collective::kScatter: ok = out == in + r * d.count * es; break;
      case Collective::kReduceScatter:  // reduced from a private copy of the input
      case Collective::kAlltoall:
      case Collective::kAlltoallV: ok = true; break;  // the input is copied first
      default: break;
    }
    RINGCC_CHECK_ARG(ok, name, ": input and output buffers overlap in a way that is not the in-place form");
  }
}

OpHeader Communicator::header_for(const OpDesc& d) {
  OpHeader h;
  h.kind = d.kind;
  h.dtype = d.dtype;
  h.has_op = d.has_op ? 1 : 0;
  h.op = d.has_op ? d.op : ReduceOp::kSum;
  h.count = d.count;
  const bool rooted = is_rooted(d.kind);
  h.root = rooted ? d.root : -1;
  h.compression = d.compression;
  switch (d.kind) {
    case Collective::kAllgatherV:
    case Collective::kReduceScatter:
      h.count = sum(d.counts);
      h.aux = hash_counts(d.counts);
      break;
    case Collective::kAlltoallV: h.count = OpHeader::kNotCompared; break;
    case Collective::kBarrier: h.count = 0; h.dtype = DataType::kUInt8; break;
    case Collective::kSendRecv: h.aux = static_cast<uint64_t>(d.tag); break;
    default: break;
  }
  // Point-to-point messages are numbered per pair and direction, so they do not
  // disturb the numbering of collectives on ranks that do not take part.
  if (d.kind == Collective::kSendRecv) h.seq = ++(d.is_send ? send_seq_ : recv_seq_)[d.peer];
  else h.seq = next_seq_++;
  return h;
}

std::shared_ptr<Work> Communicator::submit(OpDesc d) { return enqueue(std::move(d), false); }

std::shared_ptr<Work> Communicator::run(OpDesc d) { return enqueue(std::move(d), true); }

std::shared_ptr<Work> Communicator::enqueue(OpDesc d, bool inline_if_idle) {
  validate(d);
  std::unique_lock<std::mutex> lock(mu_);
  RINGCC_CHECK_ARG(connected_, "communicator is not connected");
  if (closed_ || stopping_) {
    lock.unlock();
    std::lock_guard<std::mutex> reason_lock(reason_mu_);
    if (aborted_.load())
      std::rethrow_exception(make_error(abort_kind_, detail::concat(collective_name(d.kind), ": rank ", rank_,
                                                                    ": the communicator was aborted earlier: ",
                                                                    abort_reason_)));
    if (!user_abort_.empty())
      RINGCC_THROW(AbortedError, collective_name(d.kind), ": rank ", rank_, ": ", user_abort_);
    RINGCC_THROW(AbortedError, collective_name(d.kind), ": rank ", rank_, ": the communicator is closed");
  }
  OpHeader h = header_for(d);
  auto work = std::make_shared<Work>(h);
  Queued q{std::move(d), h, work};
  if (inline_if_idle && queue_.empty() && !busy_) {
    busy_ = true;
    lock.unlock();
    // busy_ must be cleared however run_one() leaves, or close() would wait forever.
    struct Idle {
      Communicator* c;
      ~Idle() { c->set_idle(); }
    } idle{this};
    run_one(q);
    return work;
  }
  const bool p2p = q.desc.kind == Collective::kSendRecv;
  queue_.push_back(std::move(q));
  pushed_.fetch_add(1);
  lock.unlock();
  cv_.notify_all();
  // A running batch may be asleep on its links; it should take this one in now.
  if (p2p && p2p_batch_open_.load()) mesh_.interrupt();
  return work;
}

OpContext Communicator::make_context(const OpHeader& h, const Deadline& deadline) {
  OpContext ctx;
  ctx.mesh = &mesh_;
  ctx.op = h;
  ctx.deadline = deadline;
  ctx.interrupted = &interrupted_;
  ctx.spin_seconds = options_.spin_seconds;
  ctx.yield_while_spinning = oversubscribed_;
  ctx.history = &history_;
  return ctx;
}

void Communicator::execute(const OpDesc& d, const OpHeader& h) {
  if (d.kind != Collective::kSendRecv) history_.record(h);  // one operation executes at a time
  OpContext ctx = make_context(h, deadline_for(d, options_.timeout_seconds));
  algorithms::Tuning t{d.segment_bytes ? d.segment_bytes : options_.segment_bytes,
                       options_.small_message_bytes};
  OpDesc local = d;
  if (local.algorithm == Algorithm::kAuto) local.algorithm = options_.allreduce_algorithm;
  switch (d.kind) {
    case Collective::kAllreduce: algorithms::allreduce(ctx, local, t, scratch_); break;
    case Collective::kReduce: algorithms::reduce(ctx, local, t, scratch_); break;
    case Collective::kReduceScatter: algorithms::reduce_scatter(ctx, local, t, scratch_); break;
    case Collective::kBroadcast: algorithms::broadcast(ctx, local, t); break;
    case Collective::kAllgather:
    case Collective::kAllgatherV: algorithms::allgather(ctx, local, t); break;
    case Collective::kGather: algorithms::gather(ctx, local); break;
    case Collective::kScatter: algorithms::scatter(ctx, local); break;
    case Collective::kAlltoall:
    case Collective::kAlltoallV:
      if (overlaps(d.in, d.in_bytes, d.out, d.out_bytes)) {
        char* copy = scratch_.get(2, d.in_bytes);
        std::memcpy(copy, d.in, d.in_bytes);
        local.in = copy;
      }
      algorithms::alltoall(ctx, local);
      break;
    case Collective::kBarrier: algorithms::barrier(ctx); break;
    case Collective::kSendRecv: RINGCC_ASSERT(!"send/recv runs in run_p2p_batch()"); break;
    case Collective::kConnect: break;
  }
}

void Communicator::fail(AbortKind kind, const std::string& reason) noexcept {
  std::string text;
  {
    std::lock_guard<std::mutex> lock(reason_mu_);
    if (aborted_.load()) return;
    // An operation cut short by abort() fails first, from its own thread: what the
    // peers must hear is why abort() was called, not that something was interrupted.
    if (kind == AbortKind::kUser && !user_abort_.empty() && reason != user_abort_)
      text = detail::concat(user_abort_, " [", reason, "]");
    else
      text = reason;
    abort_reason_ = text;
    abort_kind_ = kind;
    aborted_.store(true);
  }
  mesh_.abort(kind, text);
}

void Communicator::progress_loop() {
  for (;;) {
    Queued q;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return !busy_ && (stopping_ || !queue_.empty()); });
      if (queue_.empty()) return;
      q = std::move(queue_.front());
      queue_.pop_front();
      busy_ = true;
    }
    try {
      run_one(q);
    } catch (...) {
      // run_one() reports through the Work; nothing may end this thread early.
    }
    set_idle();
  }
}

void Communicator::set_idle() {
  bool wake;
  {
    std::lock_guard<std::mutex> lock(mu_);
    busy_ = false;
    // Waking the progress thread when it has nothing to do costs a context switch per
    // blocking call: only wake it for queued work or shutdown, and wait_idle() callers.
    wake = !queue_.empty() || stopping_ || idle_waiters_ > 0;
  }
  if (wake) cv_.notify_all();
}

void Communicator::run_one(Queued& q) {
  if (aborted_.load() || interrupted_.load()) {
    std::lock_guard<std::mutex> lock(reason_mu_);
    q.work->finish(aborted_.load()
                       ? make_error(abort_kind_, "the communicator was aborted earlier: " + abort_reason_)
                       : make_error(AbortKind::kUser,
                                    describe(q.header) + " was cancelled: " +
                                        (user_abort_.empty() ? "the communicator is being aborted" : user_abort_)));
    return;
  }
  if (q.desc.kind == Collective::kSendRecv) {
    run_p2p_batch(q);
    return;
  }
  q.work->finish(guarded([&] { execute(q.desc, q.header); }));
}

namespace {

// The abort kind and text of a failure; false for exceptions that are not communication
// errors (bad arguments and the like), which keep their own type.
bool classify(std::exception_ptr error, AbortKind* kind, std::string* text) {
  *kind = AbortKind::kGeneric;
  bool comm_error = true;
  try {
    std::rethrow_exception(error);
  } catch (const RemoteAbort& ra) {
    *kind = ra.kind;
    *text = ra.text;
  } catch (const TimeoutError& e) {
    *kind = AbortKind::kTimeout;
    *text = e.what();
  } catch (const MismatchError& e) {
    *kind = AbortKind::kMismatch;
    *text = e.what();
  } catch (const PeerError& e) {
    *kind = AbortKind::kPeer;
    *text = e.what();
  } catch (const AbortedError& e) {
    *kind = AbortKind::kUser;
    *text = e.what();
  } catch (const Error& e) {
    *text = e.what();
  } catch (const std::exception& e) {
    *text = e.what();
    comm_error = false;
  } catch (...) {
    comm_error = false;
  }
  if (text->empty()) *text = "unknown error";
  return comm_error;
}

}  // namespace

std::exception_ptr Communicator::guarded(const std::function<void()>& body) {
  AbortKind kind;
  std::string text;
  try {
    body();
    return nullptr;
  } catch (...) {
    classify(std::current_exception(), &kind, &text);
  }
  // Tell every peer first, so ranks blocked elsewhere fail now, not at their timeout.
  fail(kind, text);  // noexcept: Mesh::abort never throws
  std::lock_guard<std::mutex> lock(reason_mu_);
  return make_error(abort_kind_, abort_reason_);
}

std::vector<std::pair<int, int>> Communicator::reap_dead_local_peers(const std::vector<std::string>& infos) {
  std::vector<std::pair<int, int>> dead;
  PeerInfo own;
  try {
    own = parse_rendezvous_record(local_info(), rank_);
  } catch (const std::exception&) {
    return dead;
  }
  for (int r = 0; r < size_ && r < static_cast<int>(infos.size()); ++r) {
    if (r == rank_) continue;
    PeerInfo peer;
    try {
      peer = parse_rendezvous_record(infos[r], r);
    } catch (const std::exception&) {
      continue;  // a malformed record: setup already says so
    }
    if (peer.host != own.host || peer.pid == getpid() || kill(peer.pid, 0) == 0 || errno != ESRCH) continue;
    dead.emplace_back(r, peer.pid);
    if (!peer.shm.empty()) transport::shm::remove_orphaned_segment(peer.shm, r, size_);
  }
  return dead;
}

void Communicator::setup_failed(const std::vector<std::string>& infos, std::exception_ptr error) {
  // A rank killed during setup never removes its shared-memory name: whoever sees the
  // setup fail removes those of same-host peers that are gone, and names them, since
  // what failed here may only be a consequence (a peer that gave up before this rank
  // mapped its segment, a connection that never came).
  const auto dead = reap_dead_local_peers(infos);
  AbortKind kind;
  std::string text;
  if (!classify(error, &kind, &text)) {
    fail(AbortKind::kGeneric, detail::concat("rank ", rank_, ": setup failed: ", text));
    std::rethrow_exception(error);  // e.g. invalid_argument: keeps its type
  }
  std::string note;
  for (auto [r, pid] : dead)
    if (text.find(detail::concat("rank ", r, " died")) == std::string::npos &&
        text.find(detail::concat("rank ", r, " (pid ")) == std::string::npos)
      note += detail::concat(note.empty() ? "" : ", ", "rank ", r, " (pid ", pid, ")");
  if (!note.empty()) {
    text += detail::concat(" [", note, " died during setup: no such process on this host]");
    if (kind == AbortKind::kGeneric || kind == AbortKind::kTimeout) kind = AbortKind::kPeer;
  }
  // Peers still in setup fail at once with this reason instead of at their timeout.
  fail(kind, text);
  std::rethrow_exception(make_error(kind, text));
}

namespace {

// The operations of one point-to-point batch; operation i owns transfer i.
class P2PBatch : public TransferFeed {
 public:
  using Add = std::function<void(OpDesc&&, const OpHeader&, std::shared_ptr<Work>)>;
  // Hands each newly queued point-to-point operation to `add`; returns whether any.
  using Take = std::function<bool(const Add& add)>;

  P2PBatch(OpContext& ctx, double default_timeout, Take take)
      : ctx_(ctx), default_timeout_(default_timeout), take_(std::move(take)) {}

  void add(OpDesc d, const OpHeader& h, std::shared_ptr<Work> w, std::vector<Transfer>& transfers) {
    Deadline deadline = deadline_for(d, default_timeout_);
    ops_.push_back(Op{std::move(d), h, std::move(w), deadline, false});
    const Op& op = ops_.back();
    Transfer t = algorithms::send_recv_transfer(op.desc);
    t.op = &op.header;  // deque elements never move
    transfers.push_back(t);
    retarget();
  }

  bool pull(std::vector<Transfer>& transfers) override {
    return take_([&](OpDesc&& d, const OpHeader& h, std::shared_ptr<Work> w) {
      add(std::move(d), h, std::move(w), transfers);
    });
  }

  void completed(size_t index) override {
    Op& op = ops_[index];
    op.done = true;
    retarget();
    op.work->finish(nullptr);
  }

  void fail_unfinished(std::exception_ptr error) {
    for (Op& op : ops_)
      if (!op.done) {
        op.done = true;
        op.work->finish(error);
      }
  }

 private:
  struct Op {
    OpDesc desc;
    OpHeader header;
    std::shared_ptr<Work> work;
    Deadline deadline;
    bool done;
  };

  // Timeouts and messages follow the unfinished operation that expires first.
  void retarget() {
    const Op* first = nullptr;
    for (const Op& op : ops_)
      if (!op.done && (!first || op.deadline.at < first->deadline.at)) first = &op;
    if (!first) return;
    ctx_.deadline = first->deadline;
    ctx_.op = first->header;
  }

  OpContext& ctx_;
  double default_timeout_;
  Take take_;
  std::deque<Op> ops_;
};

}  // namespace

void Communicator::run_p2p_batch(Queued& first) {
  OpContext ctx = make_context(first.header, Deadline::after(options_.timeout_seconds));
  uint64_t seen = ~uint64_t(0);  // the first look always checks the queue
  // Takes the point-to-point operations now at the front of the queue; only looks
  // (locks) when something was queued since the last look.
  auto take = [this, &seen](const P2PBatch::Add& add) {
    uint64_t now = pushed_.load();
    if (now == seen) return false;
    seen = now;
    bool any = false;
    std::lock_guard<std::mutex> lock(mu_);
    while (!queue_.empty() && queue_.front().desc.kind == Collective::kSendRecv) {
      Queued& q = queue_.front();
      add(std::move(q.desc), q.header, std::move(q.work));
      queue_.pop_front();
      any = true;
    }
    return any;
  };
  P2PBatch batch(ctx, options_.timeout_seconds, take);
  std::vector<Transfer> transfers;
  batch.add(std::move(first.desc), first.header, first.work, transfers);
  batch.pull(transfers);  // those queued before this batch started
  p2p_batch_open_.store(true);
  std::exception_ptr error = guarded([&] { ctx.exchange(transfers, batch); });
  p2p_batch_open_.store(false);
  if (error) batch.fail_unfinished(error);
}

void Communicator::check_not_progress_thread(const char* what) const {
  // A done-callback runs on the progress thread; it cannot wait for that thread to end.
  if (thread_.joinable() && std::this_thread::get_id() == thread_.get_id())
    RINGCC_THROW(std::invalid_argument, what, "() cannot be called from a done-callback (it runs on the ",
                 "communicator's progress thread); call it from another thread");
}

void Communicator::close() {
  check_not_progress_thread("close");
  std::lock_guard<std::mutex> life(lifecycle_mu_);  // one closer joins the thread
  bool already;
  {
    std::unique_lock<std::mutex> lock(mu_);
    already = closed_;  // also after abort(), which has joined the thread
    closed_ = true;
    stopping_ = true;
  }
  if (!already) {
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
    wait_idle();
    if (!aborted_.load()) mesh_.close();
  }
  mesh_.release();  // nothing can run any more: a closed communicator holds no socket
}

void Communicator::abort(const std::string& reason) {
  check_not_progress_thread("abort");
  const std::string text = detail::concat("rank ", rank_, " aborted the communicator: ", reason);
  {
    std::lock_guard<std::mutex> lock(reason_mu_);
    if (user_abort_.empty()) user_abort_ = text;  // before anything can fail because of it
  }
  // Links belong to the progress thread: interrupt it, let it fail what it runs, join
  // it, and only then tell the peers from this thread.
  interrupted_.store(true);
  mesh_.interrupt();
  // Taken after the interrupt: a close() draining the queue in another thread now
  // finishes quickly (queued work is cancelled), so this never waits long.
  std::lock_guard<std::mutex> life(lifecycle_mu_);
  {
    std::unique_lock<std::mutex> lock(mu_);
    stopping_ = true;
    closed_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  wait_idle();  // an operation running inline on a caller thread sees interrupted_ soon
  fail(AbortKind::kUser, text);
  // The links stay open until close() or destruction: a peer still sending to this rank
  // reads the abort frame instead of a connection reset.
}

std::string Communicator::link_kind(int peer) {
  RINGCC_CHECK_ARG(peer >= 0 && peer < size_, "peer ", peer, " is out of range for ", size_, " ranks");
  std::lock_guard<std::mutex> life(lifecycle_mu_);  // not while close() releases the links
  return mesh_.link_kind(peer);
}

void Communicator::wait_idle() {
  std::unique_lock<std::mutex> lock(mu_);
  ++idle_waiters_;
  cv_.wait(lock, [&] { return !busy_; });
  --idle_waiters_;
}

std::string Communicator::abort_reason() {
  std::lock_guard<std::mutex> lock(reason_mu_);
  return abort_reason_;
}

}  // namespace ringcc
