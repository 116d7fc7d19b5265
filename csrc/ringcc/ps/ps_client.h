// The parameter-server client of one worker: one TCP connection per server, each
// driven by its own thread that takes requests from a FIFO queue and performs them one
// at a time (send, then wait for the reply). Every call returns a Handle at once; the
// blocking API is "submit, then wait". Requests to different servers run in parallel;
// requests to one server run in submission order (sync-mode workers must push the keys
// of one server in the same order, as with collectives).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "ringcc/common/clock.h"
#include "ringcc/common/error.h"
#include "ringcc/ps/ps_protocol.h"
#include "ringcc/transport/shm/shm_segment.h"

namespace ringcc::ps {

// An async push was refused: it lags the key by more than the staleness bound.
class StaleError : public Error {
 public:
  using Error::Error;
};

class Handle {
 public:
  // Blocks until the request finished or `timeout` seconds passed (< 0: no limit).
  // Returns false on timeout (the request keeps going); rethrows the request's error.
  bool wait(double timeout);
  bool done() const;
  void finish(std::exception_ptr err);

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::exception_ptr err_;
};

struct ClientOptions {
  int rank = 0;
  int num_workers = 1;
  std::string secret;                // the job secret both ends prove they know
  std::vector<std::string> servers;  // "host:port" of server i
  double timeout = 300.0;            // per request: connect, send and reply
  // "auto": shared memory for payloads to servers on this host; "tcp": never.
  std::string transport = "auto";
  std::string host_id;               // "" = detect (as the collectives)
  uint64_t shm_region_bytes = kDefaultShmRegionBytes;  // per direction; larger payloads use TCP
};

// How one connection moves payloads, and how many went each way so far.
struct LinkStats {
  bool shm = false;
  uint64_t shm_payloads = 0;  // requests and replies whose payload was in shared memory
  uint64_t tcp_payloads = 0;  // ... that travelled on the socket
};

class Client {
 public:
  // Connects to every server and authenticates (blocking, retried until the timeout).
  explicit Client(ClientOptions opts);
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  int num_servers() const { return static_cast<int>(links_.size()); }
  Mode mode(int server) const;
  LinkStats stats(int server) const;

  // `name` only labels the key in the server's error messages.
  std::shared_ptr<Handle> register_key(int server, uint64_t key, const std::string& name, uint64_t numel,
                                       DataType dtype);
  std::shared_ptr<Handle> init(int server, uint64_t key, const float* values, uint64_t numel);
  // Sends `grad` (encoded in `wire`), writes the reply (sync: the average of every
  // worker's push; async: the parameters after this update) to `out`. `out` may be
  // `grad`. Both must stay valid until the handle is done.
  std::shared_ptr<Handle> push_pull(int server, uint64_t key, const float* grad, float* out, uint64_t numel,
                                    Compression wire);
  std::shared_ptr<Handle> pull(int server, uint64_t key, float* out, uint64_t numel);
  // Tells the server this worker is done; a server ends once every worker has.
  std::shared_ptr<Handle> shutdown(int server);
  // Stops the threads and closes the connections; queued requests fail (idempotent).
  void close();

  struct Request {
    MsgType type = MsgType::kPull;
    uint64_t key = 0;
    std::string name;
    uint64_t numel = 0;
    DataType dtype = DataType::kFloat32;
    Compression wire = Compression::kNone;
    const float* in = nullptr;
    float* out = nullptr;
    std::shared_ptr<Handle> handle;
  };

 private:
  struct Link {
    int index = 0;
    std::string address;
    int fd = -1;
    Mode mode = Mode::kSync;
    std::thread thread;
    std::mutex mu;
    std::condition_variable cv;
    std::deque<Request> queue;
    bool closing = false;
    std::string broken;  // why the connection cannot be used any more ("" if fine)
    std::unordered_map<uint64_t, uint64_t> seen;  // key -> round / version last served
    std::vector<char> scratch;
    // Same-host server: requests at shm.data(), replies at shm.data() + shm_region.
    // Set while connecting, before the constructor returns; the counters are read by
    // other threads.
    transport::shm::Mapping shm;
    uint64_t shm_region = 0;
    std::atomic<uint64_t> shm_payloads{0};
    std::atomic<uint64_t> tcp_payloads{0};
  };

  std::shared_ptr<Handle> submit(int server, Request r);
  void run(Link& l);
  void execute(Link& l, Request& r);
  void attach_shm(Link& l, const Deadline& deadline, const std::string& where);
  // The HELLO / CHALLENGE / AUTH exchange on a fresh connection; sets l.mode.
  void authenticate(Link& l, const Deadline& deadline, const std::string& where);

  ClientOptions opts_;
  std::string host_key_;
  std::vector<std::unique_ptr<Link>> links_;
};

}  // namespace ringcc::ps
