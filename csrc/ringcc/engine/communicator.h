// A communicator: one rank's membership in a group, its links to every peer, and the
// progress thread that runs its operations one at a time in the order they were issued.
//
// Life cycle: construct (creates endpoints) -> local_info() to the rendezvous store ->
// connect(all infos) -> submit()* -> close() or abort().
// After any communication error the communicator is aborted: every peer is told, and
// every later operation fails with the original reason (like a NCCL communicator,
// it must be re-created).
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "ringcc/algorithms/algorithms.h"
#include "ringcc/engine/mesh.h"
#include "ringcc/engine/op.h"
#include "ringcc/engine/work.h"

namespace ringcc {

struct CommOptions {
  MeshOptions mesh;
  double timeout_seconds = 1800;     // per operation and for setup
  double spin_seconds = 100e-6;      // busy-wait before blocking
  size_t segment_bytes = 256 << 10;  // frame size of pipelined algorithms
  size_t small_message_bytes = 64 << 10;
  Algorithm allreduce_algorithm = Algorithm::kAuto;
};

class Communicator {
 public:
  Communicator(int rank, int size, CommOptions options);
  ~Communicator();

  int rank() const { return rank_; }
  int size() const { return size_; }
  const CommOptions& options() const { return options_; }
  std::string local_info() const { return mesh_.local_info(); }
  // Connects to every peer (proving knowledge of the job `secret` on every TCP
  // connection), runs the setup barrier and starts the progress thread.
  void connect(const std::vector<std::string>& infos, const std::string& secret);
  // "shm", "tcp" or "self"; also after close().
  std::string link_kind(int peer);

  // Validates `d` (throws std::invalid_argument / DtypeError at once, nothing queued)
  // and queues it for the progress thread.
  std::shared_ptr<Work> submit(OpDesc d);
  // Like submit(), for a caller that will wait at once: when nothing is queued or
  // running, the operation runs on the calling thread, which saves the two thread
  // hand-offs (tens of microseconds each on a busy machine) of a small collective.
  // Order is kept: otherwise it is queued like submit().
  std::shared_ptr<Work> run(OpDesc d);

  // Finishes queued operations, says goodbye to every peer and closes the links (also
  // after abort()). Idempotent.
  void close();
  // Fails queued and running operations and tells every peer, with `reason` (also
  // when an operation it interrupts fails first). Links stay open until close() or
  // destruction, so that peers still sending read the reason. Idempotent.
  void abort(const std::string& reason);
  bool is_aborted() const { return aborted_.load(); }
  // The error that aborted the communicator ("" if none).
  std::string abort_reason();

 private:
  void validate(const OpDesc& d) const;
  OpHeader header_for(const OpDesc& d);
  struct Queued;
  std::shared_ptr<Work> enqueue(OpDesc d, bool inline_if_idle);
  void progress_loop();
  void run_one(Queued& q);
  // Runs `first` and every point-to-point operation queued behind it (also those queued
  // while it runs) as one exchange; each Work finishes as soon as its own data is done.
  void run_p2p_batch(Queued& first);
  // Runs `body`; if it throws, aborts the communicator (telling every peer) and returns
  // the error each affected Work gets. nullptr when `body` succeeded.
  std::exception_ptr guarded(const std::function<void()>& body);
  // A failed connect(): removes the shared-memory names of same-host peers that died,
  // tells the peers, and throws the error (naming the dead ranks). Never returns.
  [[noreturn]] void setup_failed(const std::vector<std::string>& infos, std::exception_ptr error);
  // (rank, pid) of the same-host peers in `infos` whose process is gone; removes their
  // segment names.
  std::vector<std::pair<int, int>> reap_dead_local_peers(const std::vector<std::string>& infos);
  OpContext make_context(const OpHeader& h, const Deadline& deadline);
  void execute(const OpDesc& d, const OpHeader& h);
  void fail(AbortKind kind, const std::string& reason) noexcept;
  void check_not_progress_thread(const char* what) const;
  // Waits until no operation executes; links may then be used from this thread.
  void wait_idle();
  // Clears busy_ after an operation and wakes whoever needs to know.
  void set_idle();

  struct Queued {
    OpDesc desc;
    OpHeader header;
    std::shared_ptr<Work> work;
  };

  const int rank_, size_;
  CommOptions options_;
  Mesh mesh_;
  algorithms::Scratch scratch_;

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Queued> queue_;
  bool stopping_ = false;
  bool busy_ = false;  // an operation is executing (on the progress or a caller thread)
  int idle_waiters_ = 0;  // threads in wait_idle()
  bool connected_ = false;
  bool closed_ = false;
  uint64_t next_seq_ = 1;
  OpHistory history_;  // headers of the latest collectives, for mismatch reports
  std::atomic<uint64_t> pushed_{0};        // operations ever queued (lets a p2p batch look cheaply)
  std::atomic<bool> p2p_batch_open_{false};  // a p2p batch runs: wake it when more p2p is queued
  std::vector<uint64_t> send_seq_, recv_seq_;
  std::thread thread_;
  std::mutex lifecycle_mu_;  // serialises close() and abort()

  bool oversubscribed_ = false;  // more local ranks than CPUs this process may use
  std::atomic<bool> aborted_{false};
  std::atomic<bool> interrupted_{false};
  std::mutex reason_mu_;
  std::string abort_reason_;
  std::string user_abort_;  // "rank r aborted the communicator: <reason>", set by abort()
  AbortKind abort_kind_ = AbortKind::kGeneric;
};

}  // namespace ringcc
