// The parameter server: holds fp32 keys, aggregates pushes, serves pulls.
//
// One event-loop thread polls the listening socket, a wake-up pipe and every client
// connection (all non-blocking, partial reads and writes resumed where they stopped),
// so a slow or misbehaving client never holds up the others. All key state is touched
// only by that thread; the public methods just start, stop and wait for it.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "ringcc/ps/ps_protocol.h"

namespace ringcc::ps {

struct ServerOptions {
  std::string listen_host;  // numeric IP; "" = all interfaces
  int num_workers = 1;
  Mode mode = Mode::kSync;
  std::string secret;       // the job secret every connection must prove it knows
  double handshake_timeout = 10.0;  // seconds a new connection has to authenticate
  double timeout = 300.0;   // sync: how long a started round may wait for the others
  // async: SGD with momentum applied on the server, in fp32.
  float lr = 0.01f;
  float momentum = 0.0f;
  float weight_decay = 0.0f;
  uint64_t staleness = 0;   // async: a push may lag the key's version by at most this
  // "auto": payloads of workers on this host go through shared memory; "tcp": never.
  std::string transport = "auto";
  std::string host_id;      // equal ids mean "same host"; "" = detect (as the collectives)
};

// One key's durable state: what a checkpoint holds. An open sync round (a partial sum)
// is not part of it: the workers retry that round against the restored server.
struct KeyState {
  uint64_t id = 0;
  std::string name;
  uint64_t numel = 0;
  DataType dtype = DataType::kFloat32;
  uint64_t version = 0;          // sync: completed rounds; async: updates applied
  std::vector<float> values;     // sync: the last round's average; async: the parameters
  std::vector<float> momentum;   // async with momentum; empty when never allocated
};

class Server {
 public:
  explicit Server(ServerOptions opts);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Binds the listener and starts the event loop; address() is valid afterwards.
  void start();
  const std::string& address() const { return address_; }
  // Stops the loop and closes every connection (idempotent).
  void stop();
  // Blocks until the loop has ended (every worker sent SHUTDOWN, stop(), or a fatal
  // error) or `timeout` seconds passed (< 0: forever). True if it ended.
  bool wait(double timeout);
  bool running() const { return running_.load(); }
  // The loop's fatal error, if it died of one ("" otherwise).
  std::string error() const;

  // Every key's state at one instant between two requests. While the loop runs, the
  // loop thread makes the copy (it owns the state); after it ended, the caller does.
  std::vector<KeyState> snapshot();
  // Before start(): serve these keys (from a checkpoint) instead of an empty table. A
  // restored server's key set is fixed: REGISTER of any other key is refused.
  void restore(std::vector<KeyState> keys);

  struct Impl;

 private:
  ServerOptions opts_;
  std::string address_;
  std::unique_ptr<Impl> impl_;
  std::thread thread_;
  std::atomic<bool> running_{false};
  mutable std::mutex mu_;
  std::condition_variable done_cv_;
  bool done_ = false;
  std::string error_;
  std::vector<KeyState> restored_;
  bool has_restored_ = false;
  std::mutex snap_call_mu_;  // one snapshot() at a time
};

}  // namespace ringcc::ps
