#include "ringcc/engine/protocol.h"

#include <sstream>

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

}  // namespace ringcc
