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
    case MsgType::kOk: case MsgType::kData: case MsgType::kError:
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

}  // namespace ringcc::ps
