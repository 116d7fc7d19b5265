#include "ringcc/transport/shm/shm_segment.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cctype>
#include <climits>
#include <cstring>
#include <new>
#include <random>

#include "ringcc/common/error.h"

namespace ringcc::transport::shm {
namespace {

constexpr uint64_t kSegmentMagic = 0x52494e4743435348ull;  // "RINGCCSH"

size_t control_bytes() { return (sizeof(ControlBlock) + 4095) & ~size_t(4095); }
size_t ring_stride(size_t ring_bytes) { return sizeof(RingHeader) + ring_bytes; }

// One copy of the layout fields of a control block another process may still write.
SegmentHeader header_of(const ControlBlock* c) {
  std::atomic_thread_fence(std::memory_order_acquire);
  SegmentHeader h;
  h.magic = c->magic;
  h.world_size = c->world_size;
  h.rank = c->rank;
  h.pid = c->pid;
  h.ring_bytes = c->ring_bytes;
  return h;
}

long futex(std::atomic<uint32_t>* addr, int op, uint32_t val, const timespec* ts) {
  // Not FUTEX_PRIVATE: the word lives in memory shared between processes.
  return syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), op, val, ts, nullptr, 0);
}

}  // namespace

bool segment_size(uint64_t world_size, uint64_t ring_bytes, uint64_t* bytes) {
  if (world_size < 1 || world_size > static_cast<uint64_t>(kMaxWorldSize) || ring_bytes < kMinRingBytes ||
      ring_bytes > kMaxRingBytes || ring_bytes % 64 != 0)
    return false;
  // At most 2^20 * (2^30 + 128) + control: far below 2^64.
  *bytes = control_bytes() + world_size * ring_stride(ring_bytes);
  return true;
}

std::string check_segment_header(const SegmentHeader& h, uint64_t file_size, int expected_rank, int world_size) {
  if (h.magic != kSegmentMagic) return detail::concat("bad magic 0x", std::hex, h.magic, " (not a ringcc segment)");
  if (h.rank != static_cast<uint32_t>(expected_rank) || h.world_size != static_cast<uint32_t>(world_size))
    return detail::concat("it is the segment of rank ", h.rank, " of a ", h.world_size, "-rank communicator");
  if (h.pid <= 0) return detail::concat("owner pid ", h.pid, " is not a process id");
  uint64_t want = 0;
  if (!segment_size(h.world_size, h.ring_bytes, &want))
    return detail::concat("ring size ", h.ring_bytes, " bytes is out of range (", kMinRingBytes, "..", kMaxRingBytes,
                          ", a multiple of 64)");
  if (file_size != want)
    return detail::concat("the object holds ", file_size, " bytes where ", h.world_size, " rings of ", h.ring_bytes,
                          " bytes need ", want);
  return "";
}

Segment Segment::create(int rank, int world_size, size_t ring_bytes) {
  uint64_t total = 0;
  RINGCC_CHECK_ARG(segment_size(static_cast<uint64_t>(world_size), ring_bytes, &total),
                   "shared-memory ring size must be a multiple of 64 in [", kMinRingBytes, ", ", kMaxRingBytes,
                   "] bytes, got ", ring_bytes, " (world size ", world_size, ")");
  std::random_device rd;
  uint64_t nonce = (uint64_t(rd()) << 32) ^ rd();
  Segment s;
  s.name_ = detail::concat("/ringcc-", getpid(), "-", std::hex, nonce, std::dec, "-r", rank);
  s.ring_bytes_ = ring_bytes;
  s.size_ = static_cast<size_t>(total);
  s.owner_ = true;
  int fd = RINGCC_SYSCHECK(shm_open(s.name_.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600),
                           "creating shared-memory segment ", s.name_);
  if (ftruncate(fd, static_cast<off_t>(s.size_)) != 0) {
    int err = errno;
    close(fd);
    shm_unlink(s.name_.c_str());
    RINGCC_THROW(Error, "cannot size shared-memory segment ", s.name_, " to ", s.size_,
                 " bytes: ", detail::errno_string(err), " (is /dev/shm full?)");
  }
  s.base_ = mmap(nullptr, s.size_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (s.base_ == MAP_FAILED) {
    s.base_ = nullptr;
    int err = errno;
    shm_unlink(s.name_.c_str());
    RINGCC_THROW(Error, "cannot map shared-memory segment ", s.name_, ": ", detail::errno_string(err));
  }
  // ftruncate zero-fills, so atomics start at 0; construct them formally anyway.
  auto* c = new (s.base_) ControlBlock();
  c->world_size = static_cast<uint32_t>(world_size);
  c->rank = static_cast<uint32_t>(rank);
  c->pid = getpid();
  s.pid_ = c->pid;
  c->ring_bytes = ring_bytes;
  c->doorbell.store(0);
  c->sleepers.store(0);
  c->state.store(kStateAlive);
  for (int w = 0; w < world_size; ++w) {
    auto* r = new (s.ring(w)) RingHeader();
    r->head.store(0);
    r->tail.store(0);
  }
  std::atomic_thread_fence(std::memory_order_release);
  c->magic = kSegmentMagic;
  return s;
}

Segment Segment::open(const std::string& name, int expected_rank, int world_size) {
  Segment s;
  s.name_ = name;
  int fd = shm_open(name.c_str(), O_RDWR, 0600);
  if (fd < 0) {
    RINGCC_THROW(PeerError, "cannot open the shared-memory segment ", name, " of rank ",
                 expected_rank, ": ", detail::errno_string(errno),
                 " (is it on another host or container? set RINGCC_TRANSPORT=tcp)");
  }
  struct stat st {};
  if (fstat(fd, &st) != 0 || st.st_size < static_cast<off_t>(control_bytes())) {
    close(fd);
    RINGCC_THROW(PeerError, "shared-memory segment ", name, " of rank ", expected_rank,
                 " is truncated");
  }
  // Same-host peers are trusted as this user: the segment must be a regular object of
  // this user (created 0600), whatever name the store handed us.
  if (!S_ISREG(st.st_mode) || st.st_uid != geteuid()) {
    close(fd);
    RINGCC_THROW(PeerError, "shared-memory segment ", name, " of rank ", expected_rank,
                 " is not a regular object of this user (uid ", st.st_uid, ")");
  }
  s.size_ = static_cast<size_t>(st.st_size);
  s.base_ = mmap(nullptr, s.size_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (s.base_ == MAP_FAILED) {
    s.base_ = nullptr;
    RINGCC_THROW(PeerError, "cannot map shared-memory segment ", name, ": ",
                 detail::errno_string(errno));
  }
  const SegmentHeader h = header_of(s.control());  // the rings are placed from this copy alone
  if (std::string bad = check_segment_header(h, s.size_, expected_rank, world_size); !bad.empty())
    RINGCC_THROW(PeerError, "shared-memory segment ", name, " does not belong to rank ", expected_rank, " of a ",
                 world_size, "-rank communicator: ", bad);
  s.ring_bytes_ = static_cast<size_t>(h.ring_bytes);
  s.pid_ = h.pid;
  return s;
}

Segment& Segment::operator=(Segment&& o) noexcept {
  if (this != &o) {
    this->~Segment();
    name_ = std::move(o.name_);
    base_ = o.base_;
    size_ = o.size_;
    ring_bytes_ = o.ring_bytes_;
    pid_ = o.pid_;
    owner_ = o.owner_;
    unlinked_ = o.unlinked_;
    o.base_ = nullptr;
    o.owner_ = false;
  }
  return *this;
}

Segment::~Segment() {
  if (owner_) unlink();
  if (base_) munmap(base_, size_);
  base_ = nullptr;
}

RingHeader* Segment::ring(int writer) const {
  char* p = static_cast<char*>(base_) + control_bytes() +
            static_cast<size_t>(writer) * ring_stride(ring_bytes_);
  return reinterpret_cast<RingHeader*>(p);
}

void Segment::unlink() {
  if (owner_ && !unlinked_) {
    shm_unlink(name_.c_str());
    unlinked_ = true;
  }
}

void Segment::ring_doorbell() const {
  ControlBlock* c = control();
  c->doorbell.fetch_add(1, std::memory_order_seq_cst);
  // Pairs with the sleepers increment in wait_doorbell: one side always sees the other.
  if (c->sleepers.load(std::memory_order_seq_cst) != 0) {
    futex(&c->doorbell, FUTEX_WAKE, INT_MAX, nullptr);
  }
}

Mapping Mapping::create(const std::string& prefix, size_t bytes) {
  RINGCC_CHECK_ARG(bytes > 0, "shared-memory mapping of 0 bytes");
  std::random_device rd;
  uint64_t nonce = (uint64_t(rd()) << 32) ^ rd();
  Mapping m;
  m.name_ = detail::concat(prefix, getpid(), "-", std::hex, nonce);
  m.size_ = bytes;
  m.owner_ = true;
  int fd = RINGCC_SYSCHECK(shm_open(m.name_.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600),
                           "creating shared-memory object ", m.name_);
  if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
    int err = errno;
    close(fd);
    shm_unlink(m.name_.c_str());
    RINGCC_THROW(Error, "cannot size shared-memory object ", m.name_, " to ", bytes,
                 " bytes: ", detail::errno_string(err), " (is /dev/shm full?)");
  }
  m.base_ = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (m.base_ == MAP_FAILED) {
    m.base_ = nullptr;
    int err = errno;
    shm_unlink(m.name_.c_str());
    RINGCC_THROW(Error, "cannot map shared-memory object ", m.name_, ": ", detail::errno_string(err));
  }
  return m;
}

Mapping Mapping::open(const std::string& name, size_t bytes) {
  int fd = shm_open(name.c_str(), O_RDWR, 0600);
  if (fd < 0)
    RINGCC_THROW(PeerError, "cannot open shared-memory object ", name, ": ", detail::errno_string(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_uid != geteuid() ||
      st.st_size != static_cast<off_t>(bytes)) {
    close(fd);
    RINGCC_THROW(PeerError, "shared-memory object ", name, " is not a ", bytes,
                 "-byte object of this user (size ", st.st_size, ", uid ", st.st_uid, ")");
  }
  Mapping m;
  m.name_ = name;
  m.size_ = bytes;
  m.base_ = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (m.base_ == MAP_FAILED) {
    m.base_ = nullptr;
    RINGCC_THROW(PeerError, "cannot map shared-memory object ", name, ": ", detail::errno_string(errno));
  }
  return m;
}

Mapping& Mapping::operator=(Mapping&& o) noexcept {
  if (this != &o) {
    release();
    name_ = std::move(o.name_);
    base_ = o.base_;
    size_ = o.size_;
    owner_ = o.owner_;
    unlinked_ = o.unlinked_;
    o.base_ = nullptr;
    o.owner_ = false;
  }
  return *this;
}

Mapping::~Mapping() { release(); }

void Mapping::release() {
  if (owner_) unlink();
  if (base_) munmap(base_, size_);
  base_ = nullptr;
  owner_ = false;
}

void Mapping::unlink() {
  if (owner_ && !unlinked_) {
    shm_unlink(name_.c_str());
    unlinked_ = true;
  }
}

bool is_ringcc_object_name(const std::string& name, const std::string& prefix, size_t max_bytes) {
  if (name.size() <= prefix.size() || name.size() > max_bytes || name.compare(0, prefix.size(), prefix) != 0)
    return false;
  for (size_t i = prefix.size(); i < name.size(); ++i)
    if (!std::isalnum(static_cast<unsigned char>(name[i])) && name[i] != '-') return false;
  return true;
}

bool remove_orphaned_segment(const std::string& name, int expected_rank, int world_size) noexcept {
  if (name.rfind("/ringcc-", 0) != 0) return false;  // never someone else's object
  int fd = shm_open(name.c_str(), O_RDONLY, 0);
  if (fd < 0) return false;  // already gone
  struct stat st {};
  void* base = MAP_FAILED;
  if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_uid == geteuid() &&
      st.st_size >= static_cast<off_t>(control_bytes()))
    base = mmap(nullptr, control_bytes(), PROT_READ, MAP_SHARED, fd, 0);
  close(fd);
  if (base == MAP_FAILED) return false;
  const SegmentHeader h = header_of(static_cast<const ControlBlock*>(base));
  munmap(base, control_bytes());
  const bool ours = check_segment_header(h, static_cast<uint64_t>(st.st_size), expected_rank, world_size).empty();
  // ESRCH: no such process. EPERM would mean it exists (as another user).
  const bool gone = ours && h.pid != getpid() && kill(h.pid, 0) != 0 && errno == ESRCH;
  return gone && shm_unlink(name.c_str()) == 0;
}

void wait_doorbell(ControlBlock* own, uint32_t seen, long timeout_ns) {
  own->sleepers.fetch_add(1, std::memory_order_seq_cst);
  if (own->doorbell.load(std::memory_order_seq_cst) == seen) {
    timespec ts{timeout_ns / 1000000000L, timeout_ns % 1000000000L};
    futex(&own->doorbell, FUTEX_WAIT, seen, &ts);  // EAGAIN/ETIMEDOUT/EINTR all mean: re-check
  }
  own->sleepers.fetch_sub(1, std::memory_order_seq_cst);
}

}  // namespace ringcc::transport::shm
