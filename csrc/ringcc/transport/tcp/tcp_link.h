// A link to a peer over one or more TCP connections.
//
// With several connections ("streams") the byte stream is striped round-robin in
// fixed-size stripes: byte i travels on stream (i / stripe) % streams. Both sides derive
// the mapping from the byte offset alone, so no extra framing is needed, and parallel
// streams fill a long fat pipe that one TCP window cannot.
#pragma once

#include <vector>

#include "ringcc/common/clock.h"
#include "ringcc/transport/link.h"

namespace ringcc::transport::tcp {

class TcpLink final : public Link {
 public:
  TcpLink(int self, int peer, std::vector<int> fds, size_t stripe_bytes);
  ~TcpLink() override;

  LinkKind kind() const override { return LinkKind::kTcp; }
  size_t write_some(const void* data, size_t n) override;
  size_t read_some(void* dst, size_t n) override;
  size_t peek(const void** data) override;
  void consume(size_t n) override;
  PeerState peer_state() override { return PeerState::kAlive; }
  bool eof() const override { return eof_; }
  int poll_fd(bool for_write) const override;

  // Graceful end of the write side (after a bye or abort frame).
  void shutdown_write();
  // Reads and discards what the peer still sends, until EOF, until it has been quiet
  // for 50 ms, or until `deadline` (closing with its bytes unread would reset the
  // connection, and the peer would report a lost connection instead of our goodbye or
  // abort frame). Returns at once when nothing is waiting. Never throws.
  void drain(const Deadline& deadline) noexcept;

 private:
  int stream_for(uint64_t offset) const { return static_cast<int>((offset / stripe_) % fds_.size()); }
  size_t stripe_left(uint64_t offset) const { return stripe_ - static_cast<size_t>(offset % stripe_); }
  // recv() from the stream that owns offset `recv_pos_`; returns bytes, 0 if none.
  size_t recv_stream(void* dst, size_t n);
  void fill_staging();

  std::vector<int> fds_;
  size_t stripe_;
  uint64_t send_pos_ = 0;  // logical stream offset of the next byte to send
  uint64_t recv_pos_ = 0;  // logical offset of the next byte to receive from the sockets
  std::vector<char> staging_;
  size_t stage_begin_ = 0, stage_end_ = 0;
  bool eof_ = false;
};

}  // namespace ringcc::transport::tcp
