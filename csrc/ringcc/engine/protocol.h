// What travels on every link: a fixed 64-byte frame header, then the payload, then
// zero padding to a multiple of 8 bytes. Keeping every payload 8-byte aligned in the
// stream means a shared-memory ring never splits an element at its wrap point.
//
// Every DATA frame carries the header of the operation it belongs to; the receiver
// compares it with its own, so ranks that call different operations fail with a
// readable error instead of reading each other's bytes as data.
#pragma once

#include <cstdint>
#include <string>

#include "ringcc/common/dtype.h"

namespace ringcc {

enum class Collective : uint8_t {
  kAllreduce = 0,
  kBroadcast = 1,
  kAllgather = 2,
  kAllgatherV = 3,
  kReduceScatter = 4,
  kReduce = 5,
  kGather = 6,
  kScatter = 7,
  kAlltoall = 8,
  kAlltoallV = 9,
  kBarrier = 10,
  kSendRecv = 11,  // point-to-point; sequenced per peer pair, not per communicator
  kConnect = 12,   // the barrier that ends communicator setup
};
const char* collective_name(Collective c);

// How an allreduce's payload travels (fp32 data only): as is, or in the block-scaled
// 16-bit format of kernels/cpu/compress.h with fp32 accumulation at every step.
enum class Compression : uint8_t { kNone = 0, kFp16 = 1, kBf16 = 2 };
const char* compression_name(Compression c);
// The 16-bit element type on the wire (kFloat32 for kNone).
DataType wire_type(Compression c);

// What all participating ranks must agree on for one operation.
struct OpHeader {
  uint64_t seq = 0;       // collective sequence number (per peer pair for send/recv)
  uint64_t count = 0;     // element count as the caller passed it; kNotCompared to skip
  uint64_t aux = 0;       // hash of per-rank counts (v-collectives), tag (send/recv)
  int32_t root = -1;      // root rank of rooted collectives, -1 otherwise
  Collective kind = Collective::kBarrier;
  DataType dtype = DataType::kUInt8;
  ReduceOp op = ReduceOp::kSum;
  uint8_t has_op = 0;     // 1 when `op` is meaningful
  Compression compression = Compression::kNone;
  static constexpr uint64_t kNotCompared = ~uint64_t(0);
};

// Human-readable "allreduce(seq=5, dtype=float32, count=100, op=sum)".
std::string describe(const OpHeader& h);
// Names of the fields in which a and b differ, comma separated ("" if none).
std::string differing_fields(const OpHeader& a, const OpHeader& b);

enum class FrameType : uint8_t {
  kData = 1,
  kAbort = 2,  // payload: error text; the sender's communicator is dead
  kBye = 3,    // graceful close: the sender will send nothing more
};

// Error classes carried by an abort frame, so every rank raises the same Python type.
enum class AbortKind : uint8_t { kGeneric = 0, kTimeout = 1, kPeer = 2, kMismatch = 3, kUser = 4 };

constexpr uint32_t kFrameMagic = 0x52434346;  // "RCCF"
constexpr uint16_t kProtocolVersion = 2;  // 2: OpHeader::compression
constexpr size_t kMaxAbortText = 4096;
// Largest payload a data frame may announce. Real frames carry one segment or one
// point-to-point message; the cap keeps every size computation on a received length
// (padding, offsets) far from wrapping, whatever a peer claims.
constexpr uint64_t kMaxFramePayload = uint64_t(1) << 48;

struct FrameHeader {
  uint32_t magic = kFrameMagic;
  uint16_t version = kProtocolVersion;
  FrameType type = FrameType::kData;
  AbortKind abort_kind = AbortKind::kGeneric;
  uint32_t sender = 0;
  uint32_t reserved = 0;
  uint64_t payload_bytes = 0;
  OpHeader op;
};
static_assert(sizeof(FrameHeader) <= 64, "frame header must fit in 64 bytes");
constexpr size_t kFrameHeaderBytes = 64;

inline uint64_t padded(uint64_t n) { return (n + 7) & ~uint64_t(7); }

// The frame header at `p` (kFrameHeaderBytes readable bytes), copied out of the stream.
// An abort kind this version does not know becomes kGeneric (still an abort).
FrameHeader decode_frame_header(const void* p);
// "" when `h` is a well-formed header from `expected_sender`, else what is wrong with it:
// magic, version, sender, frame type, the payload length against its cap (kMaxFramePayload
// for data, kMaxAbortText for an abort, 0 for a goodbye) and the operation's enum fields.
// The receiver raises PeerError naming the peer; nothing is allocated from a header
// that fails this.
std::string check_frame_header(const FrameHeader& h, uint32_t expected_sender);
// An abort frame complete at the front of `n` readable bytes from `sender`: true with its
// kind and (sanitised) text; false while incomplete or when the bytes are not one.
bool parse_abort_frame(const void* p, size_t n, uint32_t sender, AbortKind* kind, std::string* text);

// Text received from a peer (abort reasons, error replies, echoed names) made safe to
// raise: valid UTF-8 is kept, every other byte and every control character except
// newline and tab is written as \xNN, so the Python exception keeps its type and the
// message cannot be cut at a NUL.
std::string peer_text(const char* p, size_t n);
inline std::string peer_text(const std::string& s) { return peer_text(s.data(), s.size()); }
// A decimal number from a peer or the store: digits only (no sign, no spaces, at most
// 19), in [lo, hi]; false otherwise.
bool parse_decimal(const std::string& s, uint64_t lo, uint64_t hi, uint64_t* out);

}  // namespace ringcc
