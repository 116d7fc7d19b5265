#include "ringcc/ps/ps_protocol.h"

#include <cstring>

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

Header decode_header(const void* p) {
  Header h;
  std::memcpy(&h, p, sizeof(h));
  return h;
}

namespace {

bool in_shm(const Header& h) { return (h.flags & kFlagShmPayload) != 0; }

std::string label(const KeyShape& k) { return detail::concat("key '", peer_text(k.name), "' (id ", k.id, ")"); }

}  // namespace

bool screen_request(const RequestState& s, const Header& h, const KeyShape* key, Refusal* r) {
  if (std::string bad = check_frame(h); !bad.empty()) {
    *r = Refusal{ErrorCode::kProtocol, "protocol error: " + bad};
    return true;
  }
  auto fail = [&](ErrorCode code, auto&&... parts) {
    *r = Refusal{code, detail::concat(msg_name(h.type), ": ", parts...)};
    return true;
  };
  // First, before any handshake message is looked at: a payload in shared memory is
  // only ever that of INIT or PUSH_PULL (a HELLO or AUTH claiming one has no body).
  if (in_shm(h) && h.type != MsgType::kInit && h.type != MsgType::kPushPull)
    return fail(s.authed ? ErrorCode::kBadRequest : ErrorCode::kAuth,
                "only INIT and PUSH_PULL payloads may travel in shared memory");
  if (h.type == MsgType::kHello) {
    if (s.authed) return fail(ErrorCode::kBadRequest, "this connection already said HELLO");
    if (s.challenged) return fail(ErrorCode::kAuth, "HELLO twice");
    if (h.payload_bytes != kChallengeBytes)
      return fail(ErrorCode::kAuth, "challenge of ", h.payload_bytes, " bytes, expected ", kChallengeBytes);
    return false;
  }
  if (h.type == MsgType::kAuth) {
    if (s.authed) return fail(ErrorCode::kBadRequest, "this connection is already authenticated");
    if (!s.challenged) return fail(ErrorCode::kAuth, "AUTH before HELLO");
    if (h.payload_bytes != auth::kDigestBytes)
      return fail(ErrorCode::kAuth, "proof of ", h.payload_bytes, " bytes, expected ", auth::kDigestBytes);
    return false;
  }
  if (!s.authed)
    return fail(ErrorCode::kAuth, "not authenticated: the first messages must be HELLO and AUTH (the proof "
                "of the job secret)");
  if (in_shm(h) && !s.shm_attached)
    return fail(ErrorCode::kBadRequest, "payload claimed in shared memory, but this connection has none attached");
  switch (h.type) {
    case MsgType::kShmProbe:
      if (h.payload_bytes > kMaxHostIdBytes)
        return fail(ErrorCode::kBadRequest, "host identity of ", h.payload_bytes, " bytes (at most ",
                    kMaxHostIdBytes, ")");
      return false;
    case MsgType::kShmAttach:
      if (!s.shm_offered || s.shm_attached)
        return fail(ErrorCode::kBadRequest, "not expected here (only once, after a matching SHM_PROBE)");
      if (h.payload_bytes > kMaxShmNameBytes)
        return fail(ErrorCode::kBadRequest, "object name of ", h.payload_bytes, " bytes (at most ",
                    kMaxShmNameBytes, ")");
      if (h.aux < kMinShmRegionBytes || h.aux > kMaxShmRegionBytes)
        return fail(ErrorCode::kBadRequest, "region of ", h.aux, " bytes out of range [", kMinShmRegionBytes,
                    ", ", kMaxShmRegionBytes, "]");
      return false;
    case MsgType::kRegister:
      if (h.numel == 0 || h.numel > kMaxKeyElements)
        return fail(ErrorCode::kBadRequest, "key id ", h.key, ": numel ", h.numel, " out of range [1, ",
                    kMaxKeyElements, "]");
      if (h.dtype != DataType::kFloat32)
        return fail(ErrorCode::kBadDtype, "key id ", h.key, ": dtype ", dtype_name(h.dtype),
                    " not supported (keys hold float32)");
      if (h.payload_bytes > kMaxNameBytes)
        return fail(ErrorCode::kBadRequest, "key name of ", h.payload_bytes, " bytes (at most ", kMaxNameBytes, ")");
      if (key) {
        if (key->numel != h.numel || key->dtype != h.dtype)
          return fail(ErrorCode::kBadRequest, label(*key), " is registered with numel ", key->numel, " dtype ",
                      dtype_name(key->dtype), "; this REGISTER says numel ", h.numel, " dtype ",
                      dtype_name(h.dtype));
      } else if (s.fixed_keys) {
        return fail(ErrorCode::kBadRequest, "key id ", h.key,
                    " is not in the checkpoint this server was restored from (different model or "
                    "shard layout?)");
      }
      return false;
    case MsgType::kInit:
    case MsgType::kPushPull:
    case MsgType::kPull: {
      if (!key) return fail(ErrorCode::kUnknownKey, "unknown key id ", h.key, " (not registered on this server)");
      if (h.dtype != key->dtype)
        return fail(ErrorCode::kBadDtype, label(*key), ": dtype ", dtype_name(h.dtype), ", expected ",
                    dtype_name(key->dtype));
      if (h.numel != key->numel)
        return fail(ErrorCode::kBadRequest, label(*key), ": numel ", h.numel, ", expected ", key->numel);
      if (h.type == MsgType::kInit && h.wire != Compression::kNone)
        return fail(ErrorCode::kBadRequest, label(*key), ": INIT values must be fp32 (wire none)");
      // key->numel <= kMaxKeyElements (REGISTER, restore), so this cannot wrap.
      uint64_t want = h.type == MsgType::kPull ? 0 : wire_bytes(key->numel, h.wire);
      if (h.payload_bytes != want)
        return fail(ErrorCode::kBadRequest, label(*key), ": payload of ", h.payload_bytes, " bytes, expected ", want,
                    " (", key->numel, " elements, wire ", compression_name(h.wire), ")");
      if (in_shm(h) && h.payload_bytes > s.shm_region)
        return fail(ErrorCode::kBadRequest, label(*key), ": shared-memory payload of ", h.payload_bytes,
                    " bytes exceeds this connection's region of ", s.shm_region, " bytes");
      return false;
    }
    case MsgType::kShutdown:
      if (h.payload_bytes != 0) return fail(ErrorCode::kBadRequest, "unexpected payload");
      return false;
    default:
      return fail(ErrorCode::kProtocol, "a server accepts requests only");
  }
}

std::string check_reply(const Header& rep, const Header& req, uint64_t shm_region) {
  if (std::string bad = check_frame(rep); !bad.empty()) return bad;
  if (rep.type == MsgType::kError) {
    if (rep.flags != 0) return "ERROR reply claims a shared-memory payload";
    if (rep.payload_bytes > kMaxErrorText)
      return detail::concat("error text of ", rep.payload_bytes, " bytes (at most ", kMaxErrorText, ")");
    return "";
  }
  const bool wants_data = req.type == MsgType::kPushPull || req.type == MsgType::kPull;
  const MsgType want = req.type == MsgType::kHello ? MsgType::kChallenge : wants_data ? MsgType::kData : MsgType::kOk;
  if (rep.type != want)
    return detail::concat("unexpected ", msg_name(rep.type), " reply of ", rep.payload_bytes, " bytes to ",
                          msg_name(req.type));
  if (want == MsgType::kChallenge) {
    if (rep.flags != 0 || rep.payload_bytes != kChallengeBytes + auth::kDigestBytes)
      return detail::concat("CHALLENGE of ", rep.payload_bytes, " bytes (flags ", rep.flags, "), expected ",
                            kChallengeBytes + auth::kDigestBytes);
    return "";
  }
  if (want == MsgType::kOk) {
    if (rep.flags != 0 || rep.payload_bytes != 0)
      return detail::concat("OK reply to ", msg_name(req.type), " with a payload of ", rep.payload_bytes,
                            " bytes (flags ", rep.flags, ")");
    return "";
  }
  // DATA: the key and size asked for, fp32 or the push's own wire format.
  const bool wire_ok = rep.wire == Compression::kNone || (req.type == MsgType::kPushPull && rep.wire == req.wire);
  if (rep.key != req.key || rep.numel != req.numel || !wire_ok || req.numel > kMaxKeyElements ||
      rep.payload_bytes != wire_bytes(req.numel, rep.wire))
    return detail::concat(msg_name(req.type), " reply does not match the request (key ", rep.key, " vs ", req.key,
                          ", numel ", rep.numel, " vs ", req.numel, ", wire ", compression_name(rep.wire), ", ",
                          rep.payload_bytes, " bytes)");
  if ((rep.flags & kFlagShmPayload) && rep.payload_bytes > shm_region)
    return detail::concat("DATA reply of ", rep.payload_bytes,
                          " bytes claims a shared-memory payload this connection cannot hold");
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
