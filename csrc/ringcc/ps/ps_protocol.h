// Parameter-server wire protocol: a fixed 64-byte header, then `payload_bytes` of
// payload. Every request gets exactly one reply (OK, DATA or ERROR) on the same
// connection, in order; a client has at most one request outstanding per connection.
//
// The receiver validates the header before it allocates or reads anything: magic and
// version, the message type, and every count and length against a fixed cap or against
// the size the key was registered with. A bad request gets an ERROR reply whose text
// names the key and the expected and received values; its payload is read and dropped,
// so the connection stays usable.
//
// Authentication: a connection starts with HELLO (the worker's fresh random challenge).
// The server answers CHALLENGE: its own fresh challenge and its proof; the worker checks
// the proof and sends AUTH with its own; the server answers OK (or ERROR kAuth and hangs
// up). proof = HMAC-SHA256(job secret, kPsAuthContext || role || rank || num_workers ||
// worker challenge || server challenge), role 'S' or 'C', rank and num_workers as the
// HELLO states them (little endian u32, u64). The secret itself never crosses the socket,
// and a recorded handshake proves nothing against a new challenge.
//
// Same-host connections may move payloads through a shared-memory object instead (see
// kShmProbe/kShmAttach): the header still travels on the socket and carries
// kFlagShmPayload; the payload sits at the start of the request region (client to
// server) or the reply region (server to client). One request is in flight per
// connection, so each region holds one payload at a time and needs no ring.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "ringcc/common/dtype.h"
#include "ringcc/common/hmac.h"
#include "ringcc/engine/protocol.h"
#include "ringcc/kernels/cpu/compress.h"

namespace ringcc::ps {

enum class MsgType : uint8_t {
  kHello = 1,     // sender = rank, numel = num_workers, payload = worker challenge
  kRegister = 2,  // key, numel, dtype; payload = key name (for messages)
  kInit = 3,      // key, numel; payload = fp32 values
  kPushPull = 4,  // key, numel, wire, round/version; payload = gradient (wire format)
  kPull = 5,      // key, numel
  kShutdown = 6,  // this worker is done with the server
  kShmProbe = 7,  // payload = the worker's host identity; OK code 1 = same host, shm allowed
  kShmAttach = 8, // payload = shm object name, aux = bytes per region; OK = mapped
  kAuth = 9,      // payload = the worker's proof; OK code = mode
  kOk = 16,       // reply: round = key version (REGISTER/INIT), code = mode (HELLO)
  kData = 17,     // reply: key, numel, wire, round = version; payload = values
  kError = 18,    // reply: code = ErrorCode, payload = readable text
  kChallenge = 19,  // reply to HELLO: payload = server challenge || server proof
};
const char* msg_name(MsgType t);

enum class Mode : uint8_t { kSync = 0, kAsync = 1 };
const char* mode_name(Mode m);

// What an ERROR reply means; the client raises a matching exception type.
enum class ErrorCode : uint8_t {
  kGeneric = 0,
  kBadRequest = 1,  // wrong size / count / wire, inconsistent REGISTER, out-of-step round
  kBadDtype = 2,    // dtype differs from the key's
  kUnknownKey = 3,  // key never registered on this server
  kAuth = 4,        // failed or missing proof of the job secret, or a message before it
  kStale = 5,       // async push lags the key by more than the staleness bound
  kTimeout = 6,     // a sync round did not complete in time (names the missing workers)
  kProtocol = 7,    // bad magic / version / type: the connection is closed
};

constexpr uint32_t kPsMagic = 0x53504352;  // "RCPS"
constexpr uint16_t kPsProtocolVersion = 3;  // 2: flags, shared-memory payloads; 3: HMAC handshake
constexpr size_t kPsHeaderBytes = 64;
constexpr size_t kMinSecretBytes = 16;
constexpr size_t kMaxSecretBytes = 1024;
constexpr size_t kChallengeBytes = 32;
constexpr char kPsAuthContext[] = "ringcc-ps-auth-v1";
constexpr size_t kMaxNameBytes = 256;
constexpr size_t kMaxErrorText = 4096;
// One key holds at most 2^28 fp32 values (1 GiB); clients shard far below this.
constexpr uint64_t kMaxKeyElements = uint64_t(1) << 28;
// Largest payload a server reads and drops after refusing a request; beyond this the
// stream is not worth keeping and the connection is closed.
constexpr uint64_t kMaxDiscardBytes = kMaxKeyElements * 4 + 4096;

// Header flag: the payload is in the connection's shared-memory region, not on the socket.
constexpr uint16_t kFlagShmPayload = 1;
constexpr size_t kMaxHostIdBytes = 1024;
constexpr size_t kMaxShmNameBytes = 128;
constexpr const char* kShmNamePrefix = "/ringcc-ps-";
// Bytes per direction: one default 4 MiB shard in fp32 (its 16-bit wire form is
// smaller), plus a page for the small-key overhead of the block-scaled format.
constexpr uint64_t kDefaultShmRegionBytes = (uint64_t(4) << 20) + 4096;
constexpr uint64_t kMinShmRegionBytes = 4096;
constexpr uint64_t kMaxShmRegionBytes = kMaxDiscardBytes;
struct Header {
  uint32_t magic = kPsMagic;
  uint16_t version = kPsProtocolVersion;
  MsgType type = MsgType::kOk;
  uint8_t code = 0;  // ErrorCode (ERROR), Mode (HELLO's OK)
  uint32_t sender = 0;
  DataType dtype = DataType::kFloat32;
  Compression wire = Compression::kNone;
  uint16_t flags = 0;  // kFlagShmPayload
  uint64_t key = 0;
  uint64_t numel = 0;
  uint64_t payload_bytes = 0;
  uint64_t round = 0;  // sync: the round being pushed; async: version last seen / served
  uint64_t aux = 0;
  uint64_t reserved1 = 0;
};
static_assert(sizeof(Header) == kPsHeaderBytes, "ps header must be exactly 64 bytes");

// Bytes of `numel` fp32 values as they travel in `wire`.
inline uint64_t wire_bytes(uint64_t numel, Compression wire) {
  return wire == Compression::kNone ? numel * 4 : kernels::compressed_bytes(numel);
}

// "" when the fixed part (magic, version, known type) is sound, else why not.
std::string check_frame(const Header& h);
// The 64 bytes at `p` as a header (no checks: see check_frame and the two below).
Header decode_header(const void* p);

// What the server knows about a connection when a request header arrives.
struct RequestState {
  bool authed = false;        // HELLO and a correct AUTH done
  bool challenged = false;    // HELLO done, CHALLENGE sent
  bool shm_offered = false;   // SHM_PROBE matched: one SHM_ATTACH may follow
  bool shm_attached = false;  // a request/reply region is mapped
  uint64_t shm_region = 0;    // bytes per region when attached
  bool fixed_keys = false;    // restored from a checkpoint: no new keys
};
// The registered shape of the key a request names.
struct KeyShape {
  uint64_t id = 0;
  std::string name;
  uint64_t numel = 0;
  DataType dtype = DataType::kFloat32;
};
struct Refusal {
  ErrorCode code = ErrorCode::kGeneric;
  std::string text;
};
// The server's check of a request header before a byte of its payload is read or
// allocated: the fixed part (check_frame), the handshake order (HELLO, then AUTH, then
// anything), every length against its cap or against `key` (the registered shape of
// h.key, null if unknown), and where the payload may be (shared memory only for INIT
// and PUSH_PULL on a connection with a region, never before authentication). True with
// *r when refused; kAuth and kProtocol refusals end the connection.
bool screen_request(const RequestState& s, const Header& h, const KeyShape* key, Refusal* r);

// The client's check of the reply header `rep` to its request `req` (type, key, numel,
// wire) on a connection with a reply region of `shm_region` bytes (0: none): "" when
// it may be read (an ERROR with at most kMaxErrorText bytes of text on the socket, or
// the reply this request expects with exactly the size it implies), else why not.
std::string check_reply(const Header& rep, const Header& req, uint64_t shm_region);

// The handshake proof of `role` ('S' server, 'C' client); see "Authentication" above.
auth::Digest handshake_proof(const std::string& secret, char role, uint32_t rank, uint64_t num_workers,
                             const uint8_t* client_challenge, const uint8_t* server_challenge);

}  // namespace ringcc::ps
