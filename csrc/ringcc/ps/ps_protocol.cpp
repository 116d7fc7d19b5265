#include "ringcc/ps/ps_protocol.h"

#include "ringcc/common/error.h"

namespace ringcc::ps {

const char* msg_name(MsgType t) {
  switch (t) {
    case MsgType::kHello: return "HELLO";
    case MsgType::kRegister: return "REGISTER";
    case MsgType::kInit: return "INIT";
    case MsgType::kPushPull: return "PUSH_PULL";
    case MsgType::kPull: return "PULL";
    case MsgType::kShutdown: return "SHUTDOWN";
    case MsgType::kShmProbe: return "SHM_PROBE";
    case MsgType::kShmAttach: return "SHM_ATTACH";
    case MsgType::kAuth: return "AUTH";
    case MsgType::kChallenge: return "CHALLENGE";
    case MsgType::kOk: return "OK";
    case MsgType::kData: return "DATA";
    case MsgType::kError: return "ERROR";
  }
  return "unknown-message";
}

const char* mode_name(Mode m) { return m == Mode::kSync ? "sync" : "async"; }

std::string check_frame(const Header& h) {
  if (h.magic != kPsMagic)
    return detail::concat("bad magic 0x", std::hex, h.magic, " (not a ringcc parameter-server peer)");
  if (h.version != kPsProtocolVersion)
    return detail::concat("protocol version ", h.version, ", expected ", kPsProtocolVersion,
                          " (mixed ringcc versions?)");
  switch (h.type) {
    case MsgType::kHello: case MsgType::kRegister: case MsgType::kInit: case MsgType::kPushPull:
    case MsgType::kPull: case MsgType::kShutdown: case MsgType::kShmProbe: case MsgType::kShmAttach:
    case MsgType::kAuth: case MsgType::kOk: case MsgType::kData: case MsgType::kError: case MsgType::kChallenge:
      break;
    default:
      return detail::concat("unknown message type ", int(h.type));
  }
  if (static_cast<uint8_t>(h.wire) > static_cast<uint8_t>(Compression::kBf16))
    return detail::concat("unknown wire format ", int(h.wire));
  if (h.flags & ~kFlagShmPayload) return detail::concat("unknown header flags 0x", std::hex, h.flags);
  if (static_cast<int>(h.dtype) >= kNumDataTypes) return detail::concat("unknown dtype code ", int(h.dtype));
  return "";
}

auth::Digest handshake_proof(const std::string& secret, char role, uint32_t rank, uint64_t num_workers,
                             const uint8_t* client_challenge, const uint8_t* server_challenge) {
  std::string m(kPsAuthContext, sizeof(kPsAuthContext) - 1);
  m.push_back(role);
  for (int i = 0; i < 4; ++i) m.push_back(static_cast<char>(rank >> (8 * i)));
  for (int i = 0; i < 8; ++i) m.push_back(static_cast<char>(num_workers >> (8 * i)));
  m.append(reinterpret_cast<const char*>(client_challenge), kChallengeBytes);
  m.append(reinterpret_cast<const char*>(server_challenge), kChallengeBytes);
  return auth::hmac_sha256(secret.data(), secret.size(), m.data(), m.size());
}

}  // namespace ringcc::ps
