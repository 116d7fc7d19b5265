// ringcc._C._fuzz: the decoders of everything ringcc reads from a peer or from the
// rendezvous store, exposed one by one for the fuzzer (fuzz/fuzz_decoders.py) and the
// tests (tests/test_fuzz.py). Private; not part of the API.
//
// Each entry is a thin adapter around the production function (the one the data path
// calls, not a copy): it takes the received bytes, and returns a summary of what the
// decoder accepted, or raises what the data path raises (ringcc.PeerError for a peer's
// protocol violation, ValueError for a malformed address or an input too short to be
// a header at all). A crash, a hang or an unbounded allocation here is a bug.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "ringcc/common/error.h"
#include "ringcc/engine/mesh.h"
#include "ringcc/engine/protocol.h"
#include "ringcc/ps/ps_protocol.h"
#include "ringcc/transport/shm/shm_segment.h"
#include "ringcc/transport/tcp/socket.h"

namespace py = pybind11;
using namespace ringcc;

namespace {

void need(const std::string& data, size_t n, const char* what) {
  RINGCC_CHECK_ARG(data.size() >= n, what, " needs ", n, " bytes, got ", data.size());
}

py::dict frame_summary(const FrameHeader& h) {
  py::dict d;
  d["type"] = static_cast<int>(h.type);
  d["abort_kind"] = static_cast<int>(h.abort_kind);
  d["sender"] = h.sender;
  d["payload_bytes"] = h.payload_bytes;
  d["op"] = describe(h.op);
  return d;
}

py::dict ps_summary(const ps::Header& h) {
  py::dict d;
  d["type"] = ps::msg_name(h.type);
  d["code"] = static_cast<int>(h.code);
  d["sender"] = h.sender;
  d["dtype"] = dtype_name(h.dtype);
  d["wire"] = compression_name(h.wire);
  d["flags"] = h.flags;
  d["key"] = h.key;
  d["numel"] = h.numel;
  d["payload_bytes"] = h.payload_bytes;
  d["round"] = h.round;
  d["aux"] = h.aux;
  return d;
}

}  // namespace

void bind_fuzz(py::module_& parent) {
  py::module_ m = parent.def_submodule("_fuzz", "Decoders of received bytes, for fuzzing and tests (private).");

  m.attr("FRAME_HEADER_BYTES") = kFrameHeaderBytes;
  m.attr("MAX_FRAME_PAYLOAD") = kMaxFramePayload;
  m.attr("MAX_ABORT_TEXT") = kMaxAbortText;
  m.attr("MAX_RECORD_BYTES") = kMaxRecordBytes;
  m.attr("MESH_HELLO_BYTES") = kMeshHelloBytes;
  m.attr("PS_HEADER_BYTES") = ps::kPsHeaderBytes;
  m.attr("MAX_ERROR_TEXT") = ps::kMaxErrorText;

  // ------------------------------------------------------------------ collectives
  m.def(
      "frame_header",
      [](const py::bytes& b, uint32_t sender) {
        std::string data = b;
        need(data, kFrameHeaderBytes, "a frame header");
        FrameHeader h = decode_frame_header(data.data());
        if (std::string bad = check_frame_header(h, sender); !bad.empty())
          RINGCC_THROW(PeerError, "malformed frame from rank ", sender, ": ", bad);
        return frame_summary(h);
      },
      py::arg("data"), py::arg("sender"),
      "The receiver's decoding of a 64-byte frame header from rank `sender` (exchange.cpp).");
  m.def(
      "abort_frame",
      [](const py::bytes& b, uint32_t sender) -> std::optional<std::tuple<int, std::string>> {
        std::string data = b;
        AbortKind kind = AbortKind::kGeneric;
        std::string text;
        if (!parse_abort_frame(data.data(), data.size(), sender, &kind, &text)) return std::nullopt;
        return std::make_tuple(static_cast<int>(kind), text);
      },
      py::arg("data"), py::arg("sender"),
      "(kind, text) of an abort frame complete at the front of `data`, else None (idle-link check).");
  m.def(
      "peer_text", [](const py::bytes& b) {
        std::string data = b;
        return peer_text(data);
      },
      py::arg("data"), "Received text as ringcc shows it in an exception (always valid UTF-8).");
  m.def(
      "rendezvous_record",
      [](const py::bytes& b, int expected_rank) {
        std::string line = b;
        PeerInfo p = parse_rendezvous_record(line, expected_rank);
        py::dict d;
        d["rank"] = p.rank;
        d["host"] = py::bytes(p.host);
        d["tcp"] = p.tcp;
        d["shm"] = p.shm;
        d["pid"] = p.pid;
        d["nonce"] = p.nonce;
        d["streams"] = p.streams;
        return d;
      },
      py::arg("line"), py::arg("expected_rank"), "A rendezvous record as Mesh::connect parses it.");
  m.def(
      "mesh_hello",
      [](const py::bytes& b, int rank, int size, int streams, const std::vector<bool>& use_tcp)
          -> std::optional<std::tuple<int, int>> {
        std::string data = b;
        RINGCC_CHECK_ARG(size >= 1 && rank >= 0 && rank < size && streams >= 1 && use_tcp.size() == size_t(size),
                         "mesh_hello: inconsistent rank/size/streams/use_tcp");
        const size_t n = std::min(data.size(), kMeshHelloBytes);
        int from = -1, stream = -1;
        if (std::string bad = check_mesh_hello(data.data(), n, rank, size, streams, use_tcp, &from, &stream);
            !bad.empty())
          RINGCC_THROW(PeerError, "rank ", rank, " refuses the connection: ", bad);
        if (n < kMeshHelloBytes) return std::nullopt;
        return std::make_tuple(from, stream);
      },
      py::arg("data"), py::arg("rank"), py::arg("size"), py::arg("streams"), py::arg("use_tcp"),
      "The acceptor's check of a connection HELLO: (from, stream), None while incomplete.");
  m.def(
      "address",
      [](const py::bytes& b) {
        std::string addr = b, host;
        int port = 0;
        transport::tcp::split_address(addr, &host, &port);
        return std::make_tuple(py::bytes(host), port);
      },
      py::arg("address"), "A \"host:port\" / \"[v6]:port\" as the TCP transport splits it.");

  // ------------------------------------------------------------------ shared memory
  m.def(
      "segment_header",
      [](const py::bytes& b, uint64_t file_size, int expected_rank, int world_size) {
        std::string data = b;
        need(data, 32, "a segment header");
        transport::shm::SegmentHeader h;  // the first 32 bytes of the control block
        std::memcpy(&h.magic, data.data(), 8);
        std::memcpy(&h.world_size, data.data() + 8, 4);
        std::memcpy(&h.rank, data.data() + 12, 4);
        std::memcpy(&h.pid, data.data() + 16, 4);
        std::memcpy(&h.ring_bytes, data.data() + 24, 8);
        if (std::string bad = transport::shm::check_segment_header(h, file_size, expected_rank, world_size);
            !bad.empty())
          RINGCC_THROW(PeerError, "shared-memory segment refused: ", bad);
        return h.ring_bytes;
      },
      py::arg("data"), py::arg("file_size"), py::arg("expected_rank"), py::arg("world_size"),
      "The layout check of a peer's segment header; returns its ring size.");
  m.def(
      "ring_fill",
      [](uint64_t head, uint64_t tail, uint64_t capacity) {
        uint64_t fill = 0;
        if (!transport::shm::ring_fill(head, tail, capacity, &fill))
          RINGCC_THROW(PeerError, "inconsistent ring counters (consumed ", head, ", produced ", tail, ", capacity ",
                       capacity, ")");
        return fill;
      },
      py::arg("head"), py::arg("tail"), py::arg("capacity"), "Bytes in a shared-memory ring from its counters.");
  m.def(
      "open_segment",
      [](const std::string& name, int expected_rank, int world_size) {
        py::gil_scoped_release nogil;
        return transport::shm::Segment::open(name, expected_rank, world_size).ring_bytes();
      },
      py::arg("name"), py::arg("expected_rank"), py::arg("world_size"),
      "Maps and checks an existing segment as a peer would (returns its ring size).");
  m.def(
      "shm_layout",
      [](uint64_t ring_bytes) {
        auto s = transport::shm::Segment::create(0, 2, ring_bytes);
        const char* base = reinterpret_cast<const char*>(s.control());
        auto* c = s.control();
        auto* r1 = s.ring(1);
        py::dict d;
        d["ring_offset_1"] = reinterpret_cast<const char*>(r1) - base;  // ring written by rank 1
        d["head_offset"] = reinterpret_cast<const char*>(&r1->head) - reinterpret_cast<const char*>(r1);
        d["tail_offset"] = reinterpret_cast<const char*>(&r1->tail) - reinterpret_cast<const char*>(r1);
        d["state_offset"] = reinterpret_cast<const char*>(&c->state) - base;
        d["abort_kind_offset"] = reinterpret_cast<const char*>(&c->abort_kind) - base;
        d["reason_offset"] = reinterpret_cast<const char*>(c->reason) - base;
        d["reason_bytes"] = sizeof(c->reason);
        d["state_aborted"] = static_cast<uint32_t>(transport::shm::kStateAborted);
        return d;
      },
      py::arg("ring_bytes"), "Byte offsets of a 2-rank segment's fields (for tests that corrupt one).");

  // ------------------------------------------------------------------ parameter server
  m.def(
      "ps_header",
      [](const py::bytes& b) {
        std::string data = b;
        need(data, ps::kPsHeaderBytes, "a ps header");
        ps::Header h = ps::decode_header(data.data());
        if (std::string bad = ps::check_frame(h); !bad.empty()) RINGCC_THROW(PeerError, "ps protocol error: ", bad);
        return ps_summary(h);
      },
      py::arg("data"), "The fixed part of a parameter-server header, as both ends check it.");
  m.def(
      "ps_request",
      [](const py::bytes& b, bool authed, bool challenged, bool shm_offered, bool shm_attached, uint64_t shm_region,
         bool fixed_keys, std::optional<std::tuple<uint64_t, py::bytes, uint64_t>> key) {
        std::string data = b;
        need(data, ps::kPsHeaderBytes, "a ps request");
        ps::Header h = ps::decode_header(data.data());
        ps::RequestState st;
        st.authed = authed;
        st.challenged = challenged;
        st.shm_offered = shm_offered;
        st.shm_attached = shm_attached;
        st.shm_region = shm_region;
        st.fixed_keys = fixed_keys;
        ps::KeyShape shape;
        if (key) shape = ps::KeyShape{std::get<0>(*key), std::string(std::get<1>(*key)), std::get<2>(*key),
                                      DataType::kFloat32};
        ps::Refusal r;
        py::dict d = ps_summary(h);
        d["accepted"] = !ps::screen_request(st, h, key ? &shape : nullptr, &r);
        if (!d["accepted"].cast<bool>()) {
          d["error_code"] = static_cast<int>(r.code);
          d["error"] = r.text;
        }
        return d;
      },
      py::arg("data"), py::arg("authed"), py::arg("challenged"), py::arg("shm_offered"), py::arg("shm_attached"),
      py::arg("shm_region"), py::arg("fixed_keys"), py::arg("key"),
      "The server's screening of a request header on a connection in the given state; `key` is the "
      "registered (id, name, numel) of the key it names, or None.");
  m.def(
      "ps_reply",
      [](const py::bytes& b, const py::bytes& request, uint64_t shm_region) {
        std::string data = b, req = request;
        need(data, ps::kPsHeaderBytes, "a ps reply");
        need(req, ps::kPsHeaderBytes, "a ps request");
        ps::Header rep = ps::decode_header(data.data());
        if (std::string bad = ps::check_reply(rep, ps::decode_header(req.data()), shm_region); !bad.empty())
          RINGCC_THROW(PeerError, "protocol error in the reply: ", bad);
        return ps_summary(rep);
      },
      py::arg("data"), py::arg("request"), py::arg("shm_region"),
      "The client's check of a reply header to the request header `request`.");
}
