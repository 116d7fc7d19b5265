#include "ringcc/engine/protocol.h"

#include <cstring>
#include <sstream>

#include "ringcc/common/error.h"

namespace ringcc {

const char* collective_name(Collective c) {
  switch (c) {
    case Collective::kAllreduce: return "allreduce";
    case Collective::kBroadcast: return "broadcast";
    case Collective::kAllgather: return "allgather";
    case Collective::kAllgatherV: return "allgather_v";
    case Collective::kReduceScatter: return "reduce_scatter";
    case Collective::kReduce: return "reduce";
    case Collective::kGather: return "gather";
    case Collective::kScatter: return "scatter";
    case Collective::kAlltoall: return "alltoall";
    case Collective::kAlltoallV: return "alltoall_v";
    case Collective::kBarrier: return "barrier";
    case Collective::kSendRecv: return "send/recv";
    case Collective::kConnect: return "connect";
  }
  return "unknown-collective";
}

const char* compression_name(Compression c) {
  switch (c) {
    case Compression::kNone: return "none";
    case Compression::kFp16: return "fp16";
    case Compression::kBf16: return "bf16";
  }
  return "unknown-compression";
}

DataType wire_type(Compression c) {
  switch (c) {
    case Compression::kFp16: return DataType::kFloat16;
    case Compression::kBf16: return DataType::kBFloat16;
    default: return DataType::kFloat32;
  }
}

std::string describe(const OpHeader& h) {
  std::ostringstream os;
  os << collective_name(h.kind) << "(seq=" << h.seq;
  if (h.kind != Collective::kBarrier && h.kind != Collective::kConnect) {
    os << ", dtype=" << dtype_name(h.dtype);
    if (h.count != OpHeader::kNotCompared) os << ", count=" << h.count;
  }
  if (h.has_op) os << ", op=" << reduce_op_name(h.op);
  if (h.root >= 0) os << ", root=" << h.root;
  if (h.compression != Compression::kNone) os << ", compression=" << compression_name(h.compression);
  if (h.kind == Collective::kSendRecv) os << ", tag=" << static_cast<int64_t>(h.aux);
  else if (h.aux) os << ", counts-hash=" << std::hex << h.aux << std::dec;
  os << ")";
  return os.str();
}

std::string differing_fields(const OpHeader& a, const OpHeader& b) {
  std::string out;
  auto add = [&](const char* name) {
    if (!out.empty()) out += ", ";
    out += name;
  };
  if (a.kind != b.kind) add("collective");
  if (a.seq != b.seq) add("sequence number");
  if (a.dtype != b.dtype) add("dtype");
  if (a.count != b.count) add("count");
  if (a.has_op != b.has_op || (a.has_op && a.op != b.op)) add("op");
  if (a.root != b.root) add("root");
  if (a.compression != b.compression) add("compression");
  if (a.aux != b.aux) add(a.kind == Collective::kSendRecv ? "tag" : "per-rank counts");
  return out;
}

FrameHeader decode_frame_header(const void* p) {
  FrameHeader h;
  std::memcpy(&h, p, sizeof(h));
  if (static_cast<uint8_t>(h.abort_kind) > static_cast<uint8_t>(AbortKind::kUser)) h.abort_kind = AbortKind::kGeneric;
  return h;
}

std::string check_frame_header(const FrameHeader& h, uint32_t expected_sender) {
  if (h.magic != kFrameMagic) return detail::concat("bad magic 0x", std::hex, h.magic, " (not a ringcc frame)");
  if (h.version != kProtocolVersion)
    return detail::concat("frame version ", h.version, ", expected ", kProtocolVersion, " (mixed ringcc versions?)");
  if (h.sender != expected_sender)
    return detail::concat("frame claims to come from rank ", h.sender, " on the link of rank ", expected_sender);
  switch (h.type) {
    case FrameType::kData: {
      if (h.payload_bytes > kMaxFramePayload)
        return detail::concat("data frame announces ", h.payload_bytes, " bytes (at most 2^48)");
      const OpHeader& op = h.op;
      if (static_cast<uint8_t>(op.kind) > static_cast<uint8_t>(Collective::kConnect))
        return detail::concat("unknown collective code ", int(op.kind));
      if (static_cast<int>(op.dtype) >= kNumDataTypes) return detail::concat("unknown dtype code ", int(op.dtype));
      if (op.has_op > 1 || (op.has_op && static_cast<int>(op.op) >= kNumReduceOps))
        return detail::concat("unknown reduce op code ", int(op.op), " (has_op ", int(op.has_op), ")");
      if (static_cast<uint8_t>(op.compression) > static_cast<uint8_t>(Compression::kBf16))
        return detail::concat("unknown compression code ", int(op.compression));
      return "";
    }
    case FrameType::kAbort:
      if (h.payload_bytes > kMaxAbortText)
        return detail::concat("abort frame announces ", h.payload_bytes, " bytes of text (at most ", kMaxAbortText,
                              ")");
      return "";
    case FrameType::kBye:
      if (h.payload_bytes != 0) return detail::concat("goodbye frame with a payload of ", h.payload_bytes, " bytes");
      return "";
  }
  return detail::concat("unknown frame type ", int(h.type));
}

bool parse_abort_frame(const void* p, size_t n, uint32_t sender, AbortKind* kind, std::string* text) {
  if (n < kFrameHeaderBytes) return false;
  FrameHeader h = decode_frame_header(p);
  if (h.type != FrameType::kAbort || !check_frame_header(h, sender).empty()) return false;
  // payload_bytes <= kMaxAbortText here, so neither sum can wrap.
  if (n < kFrameHeaderBytes + h.payload_bytes) return false;
  *kind = h.abort_kind;
  *text = peer_text(static_cast<const char*>(p) + kFrameHeaderBytes, static_cast<size_t>(h.payload_bytes));
  return true;
}

namespace {

// Length of the well-formed UTF-8 sequence at s[0..n), 0 if there is none (RFC 3629:
// no overlong forms, no surrogates, nothing above U+10FFFF).
size_t utf8_sequence(const unsigned char* s, size_t n) {
  const unsigned char c = s[0];
  auto cont = [&](size_t i, unsigned char lo = 0x80, unsigned char hi = 0xBF) {
    return i < n && s[i] >= lo && s[i] <= hi;
  };
  if (c >= 0xC2 && c <= 0xDF) return cont(1) ? 2 : 0;
  if (c == 0xE0) return cont(1, 0xA0) && cont(2) ? 3 : 0;
  if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) return cont(1) && cont(2) ? 3 : 0;
  if (c == 0xED) return cont(1, 0x80, 0x9F) && cont(2) ? 3 : 0;
  if (c == 0xF0) return cont(1, 0x90) && cont(2) && cont(3) ? 4 : 0;
  if (c >= 0xF1 && c <= 0xF3) return cont(1) && cont(2) && cont(3) ? 4 : 0;
  if (c == 0xF4) return cont(1, 0x80, 0x8F) && cont(2) && cont(3) ? 4 : 0;
  return 0;
}

}  // namespace

std::string peer_text(const char* p, size_t n) {
  static const char kHex[] = "0123456789abcdef";
  const auto* s = reinterpret_cast<const unsigned char*>(p);
  std::string out;
  out.reserve(n);
  for (size_t i = 0; i < n;) {
    const unsigned char c = s[i];
    if (c >= 0x80) {
      if (size_t k = utf8_sequence(s + i, n - i)) {
        out.append(p + i, k);
        i += k;
        continue;
      }
    } else if (c >= 0x20 ? c != 0x7F : (c == '\n' || c == '\t')) {
      out.push_back(static_cast<char>(c));
      ++i;
      continue;
    }
    out += "\\x";
    out.push_back(kHex[c >> 4]);
    out.push_back(kHex[c & 15]);
    ++i;
  }
  return out;
}

bool parse_decimal(const std::string& s, uint64_t lo, uint64_t hi, uint64_t* out) {
  if (s.empty() || s.size() > 19) return false;
  uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + static_cast<uint64_t>(c - '0');
  }
  if (v < lo || v > hi) return false;
  *out = v;
  return true;
}

}  // namespace ringcc
