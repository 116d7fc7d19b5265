// Shared-memory layout for ranks on one host.
//
// Each rank owns one POSIX shared-memory segment holding its control block (doorbell,
// state, pid, abort reason) and one single-producer/single-consumer byte ring per peer
// for the bytes that peer sends to it (its inbox). A sender writes into the receiver's
// segment, so each ring is written by exactly one process and read by exactly one.
//
// The segment name is unlinked as soon as every peer has mapped it (end of
// communicator setup): nothing is left in /dev/shm even if a process is killed later.
// A process killed during setup leaves its name behind; the peers whose setup then
// fails remove it (remove_orphaned_segment).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

#include "ringcc/engine/protocol.h"

namespace ringcc::transport::shm {

enum : uint32_t { kStateAlive = 0, kStateClosed = 1, kStateAborted = 2 };

struct alignas(64) ControlBlock {
  uint64_t magic;
  uint32_t world_size;
  uint32_t rank;
  int32_t pid;
  uint32_t pad0;
  uint64_t ring_bytes;
  // Bumped by anyone who changes something this rank may be waiting for (data in its
  // inbox, space in a ring it writes to, a peer's abort). The owner futex-waits on it.
  alignas(64) std::atomic<uint32_t> doorbell;
  alignas(64) std::atomic<uint32_t> sleepers;
  alignas(64) std::atomic<uint32_t> state;
  uint32_t abort_kind;
  char reason[kMaxAbortText];
};

struct alignas(64) RingHeader {
  alignas(64) std::atomic<uint64_t> head;  // bytes consumed; written by the reader only
  alignas(64) std::atomic<uint64_t> tail;  // bytes produced; written by the writer only
};

class Segment {
 public:
  // Creates and maps a new segment for `rank` (owner side).
  static Segment create(int rank, int world_size, size_t ring_bytes);
  // Maps a peer's segment by name and checks its layout.
  static Segment open(const std::string& name, int expected_rank, int world_size);

  Segment() = default;
  Segment(Segment&& o) noexcept { *this = std::move(o); }
  Segment& operator=(Segment&& o) noexcept;
  ~Segment();

  const std::string& name() const { return name_; }
  ControlBlock* control() const { return reinterpret_cast<ControlBlock*>(base_); }
  RingHeader* ring(int writer) const;
  char* ring_data(int writer) const { return reinterpret_cast<char*>(ring(writer)) + sizeof(RingHeader); }
  size_t ring_bytes() const { return ring_bytes_; }
  // The owner's pid as checked when the segment was created or opened.
  int pid() const { return pid_; }
  // Removes the name (the mapping stays valid). Idempotent.
  void unlink();

  // Wake the owner of this segment if it sleeps on its doorbell.
  void ring_doorbell() const;

 private:
  std::string name_;
  void* base_ = nullptr;
  size_t size_ = 0;
  size_t ring_bytes_ = 0;
  int pid_ = 0;
  bool owner_ = false;
  bool unlinked_ = false;
};

// A plain shared-memory object of a fixed size with no layout of its own (the
// parameter server's per-connection payload regions). The creator owns the name.
class Mapping {
 public:
  // A new object named `prefix` + a random suffix (O_EXCL, mode 0600), zero-filled.
  static Mapping create(const std::string& prefix, size_t bytes);
  // Maps an existing object, which must be a regular object of this user of exactly
  // `bytes` bytes (the peer's claim is checked before anything is read).
  static Mapping open(const std::string& name, size_t bytes);

  Mapping() = default;
  Mapping(Mapping&& o) noexcept { *this = std::move(o); }
  Mapping& operator=(Mapping&& o) noexcept;
  ~Mapping();

  explicit operator bool() const { return base_ != nullptr; }
  char* data() const { return static_cast<char*>(base_); }
  size_t size() const { return size_; }
  const std::string& name() const { return name_; }
  // Removes the name (the mapping stays valid). Idempotent; owner only.
  void unlink();

 private:
  void release();  // unlink if owner, unmap

  std::string name_;
  void* base_ = nullptr;
  size_t size_ = 0;
  bool owner_ = false;
  bool unlinked_ = false;
};

// Whether `name` is a shared-memory object name this library makes: `prefix`, then
// at least one letter, digit or dash, at most `max_bytes` in all. Names read from a
// peer or the store are checked with it before anything is opened under them.
bool is_ringcc_object_name(const std::string& name, const std::string& prefix, size_t max_bytes);

// Removes the name of rank `expected_rank`'s segment if its owner process is gone: a
// rank killed during setup, before it could remove the name itself. Only a ringcc
// segment of this user whose control block passes check_segment_header for that rank
// and names a pid that no longer exists is removed. Returns whether it was; never throws.
bool remove_orphaned_segment(const std::string& name, int expected_rank, int world_size) noexcept;

// The fields of a segment's control block that describe its layout, read once from a
// peer's mapping (the peer can change them at any time, so they are copied, checked,
// and only the copy is used).
struct SegmentHeader {
  uint64_t magic = 0;
  uint32_t world_size = 0;
  uint32_t rank = 0;
  int32_t pid = 0;
  uint64_t ring_bytes = 0;
};
constexpr uint64_t kMinRingBytes = 4096;
constexpr uint64_t kMaxRingBytes = uint64_t(1) << 30;
constexpr int kMaxWorldSize = 1 << 20;
// Bytes of a segment with `world_size` rings of `ring_bytes`; false when the arguments are
// out of range (ring_bytes in [kMinRingBytes, kMaxRingBytes] and a multiple of 64,
// world_size in 1..kMaxWorldSize), so the product cannot overflow.
bool segment_size(uint64_t world_size, uint64_t ring_bytes, uint64_t* bytes);
// "" when `h`, read from a mapping of `file_size` bytes, is the segment of `expected_rank`
// in a `world_size`-rank communicator whose size matches its own ring size; else why not.
std::string check_segment_header(const SegmentHeader& h, uint64_t file_size, int expected_rank, int world_size);
// Fill level of a single-producer/single-consumer ring of `capacity` bytes from its two
// counters (bytes produced `tail`, bytes consumed `head`); false when they are
// inconsistent (tail - head > capacity), which only a corrupt or hostile peer writing
// the shared counters can cause. The caller raises PeerError instead of copying.
inline bool ring_fill(uint64_t head, uint64_t tail, uint64_t capacity, uint64_t* fill) {
  const uint64_t n = tail - head;  // modular: the counters only ever grow
  if (n > capacity) return false;
  *fill = n;
  return true;
}

// Waits on the owner's doorbell while it still equals `seen`, at most `timeout_ns`.
void wait_doorbell(ControlBlock* own, uint32_t seen, long timeout_ns);

}  // namespace ringcc::transport::shm
