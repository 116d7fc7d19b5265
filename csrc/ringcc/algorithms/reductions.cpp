// allreduce, reduce and reduce_scatter.
//
// float16/bfloat16 are widened into an fp32 workspace first and narrowed once at the
// end, so a sum of n values is rounded to 16 bits once instead of n-1 times. The
// reduce-scatter half then moves fp32 (twice the bytes of that phase); the allgather
// half moves the final 16-bit values.
// avg is a sum whose owner divides its chunk before it is shared, so the division
// happens once per element and all ranks see the same bits.
#include <cstring>

#include "ringcc/algorithms/algorithms.h"
#include "ringcc/kernels/cpu/kernels.h"

namespace ringcc::algorithms {
namespace {

struct WorkBuffer {
  char* data;       // where the reduction runs
  DataType dtype;   // its element type (fp32 for half inputs)
  size_t esize;
};

// Sets the reduction parameters on ctx and returns a workspace holding `src`
// (widened for half types). `dst` is used in place when the dtype needs no widening.
WorkBuffer prepare(OpContext& ctx, const OpDesc& d, const void* src, char* dst, size_t count,
                   Scratch& s, int slot) {
  ctx.reduce_op = d.op == ReduceOp::kAvg ? ReduceOp::kSum : d.op;
  if (is_half(d.dtype)) {
    ctx.reduce_dtype = DataType::kFloat32;
    char* ws = s.get(slot, count * 4);
    kernels::convert(ws, DataType::kFloat32, src, d.dtype, count);
    return {ws, DataType::kFloat32, 4};
  }
  ctx.reduce_dtype = d.dtype;
  size_t bytes = count * element_size(d.dtype);
  if (src != dst && bytes) std::memmove(dst, src, bytes);
  return {dst, d.dtype, element_size(d.dtype)};
}

void finish_avg(const OpDesc& d, const WorkBuffer& w, size_t first, size_t count, int n) {
  if (d.op == ReduceOp::kAvg && count) kernels::divide(w.data + first * w.esize, count, w.dtype, n);
}

bool use_recursive_doubling(const OpDesc& d, size_t bytes, const Tuning& t) {
  if (d.algorithm == Algorithm::kRing) return false;
  if (d.algorithm == Algorithm::kRecursiveDoubling) return true;
  return bytes <= t.small_message_bytes;
}

}  // namespace

void allreduce(OpContext& ctx, const OpDesc& d, const Tuning& t, Scratch& s) {
  if (d.compression != Compression::kNone) return compressed_allreduce(ctx, d, t, s);
  const int n = ctx.size();
  char* out = static_cast<char*>(d.out);
  // Out of place over the ring, the reduce-scatter reads the input where it is instead
  // of copying all of it into out first (a full pass over memory saved).
  const char* src = n > 1 && !is_half(d.dtype) && d.in != d.out &&
                            !use_recursive_doubling(d, d.count * element_size(d.dtype), t)
                        ? static_cast<const char*>(d.in)
                        : nullptr;
  WorkBuffer w = prepare(ctx, d, src ? out : d.in, out, d.count, s, 0);
  if (n > 1) {
    if (use_recursive_doubling(d, d.count * w.esize, t)) {
      recursive_doubling_allreduce(ctx, w.data, s.get(1, d.count * w.esize), d.count * w.esize);
      finish_avg(d, w, 0, d.count, n);
    } else {
      Partition part = Partition::even(d.count, n);
      const int r = ctx.rank();
      if (!is_half(d.dtype) && d.op != ReduceOp::kAvg) {
        // Nothing to do to the owned chunk between the phases: run them as one.
        ring_allreduce(ctx, w.data, part, w.esize, t.segment_bytes, src);
        return;
      }
      ring_reduce_scatter(ctx, w.data, part, w.esize, t.segment_bytes, src);
      finish_avg(d, w, part.offset[r], part.count[r], n);
      if (is_half(d.dtype)) {
        // Narrow only the chunk this rank owns; the allgather moves 16-bit values.
        size_t es = element_size(d.dtype);
        kernels::convert(out + part.offset[r] * es, d.dtype, w.data + part.offset[r] * 4,
                         DataType::kFloat32, part.count[r]);
        ring_allgather(ctx, out, part, es, t.segment_bytes);
        return;
      }
      ring_allgather(ctx, w.data, part, w.esize, t.segment_bytes);
      return;
    }
  } else {
    finish_avg(d, w, 0, d.count, n);
  }
  if (is_half(d.dtype)) kernels::convert(out, d.dtype, w.data, DataType::kFloat32, d.count);
}

void reduce(OpContext& ctx, const OpDesc& d, const Tuning& t, Scratch& s) {
  const int n = ctx.size(), r = ctx.rank();
  const bool root = r == d.root;
  // Non-roots must not touch `in` (const) and have no output: reduce in scratch.
  char* target = root ? static_cast<char*>(d.out)
                 : is_half(d.dtype) ? nullptr
                                    : s.get(2, d.count * element_size(d.dtype));
  WorkBuffer w = prepare(ctx, d, d.in, target, d.count, s, 0);
  if (n > 1 && use_recursive_doubling(d, d.count * w.esize, t)) {
    recursive_doubling_allreduce(ctx, w.data, s.get(1, d.count * w.esize), d.count * w.esize);
    finish_avg(d, w, 0, d.count, n);
  } else if (n > 1) {
    Partition part = Partition::even(d.count, n);
    ring_reduce_scatter(ctx, w.data, part, w.esize, t.segment_bytes);
    finish_avg(d, w, part.offset[r], part.count[r], n);
    // Gather the reduced chunks at the root, one frame per owner.
    std::vector<Transfer> v;
    if (root) {
      for (int c = 0; c < n; ++c)
        if (c != r)
          v.push_back(Transfer::recv(c, w.data + part.offset[c] * w.esize, part.count[c] * w.esize));
    } else {
      v.push_back(Transfer::send(d.root, w.data + part.offset[r] * w.esize, part.count[r] * w.esize));
    }
    ctx.exchange(v);
  } else {
    finish_avg(d, w, 0, d.count, n);
  }
  if (root && is_half(d.dtype)) kernels::convert(d.out, d.dtype, w.data, DataType::kFloat32, d.count);
}

void reduce_scatter(OpContext& ctx, const OpDesc& d, const Tuning& t, Scratch& s) {
  const int n = ctx.size(), r = ctx.rank();
  Partition part = Partition::from_counts(d.counts);
  const size_t total = part.total();
  // The input is read-only: reduce a copy (widened for half types).
  char* copy = is_half(d.dtype) ? nullptr : s.get(2, total * element_size(d.dtype));
  WorkBuffer w = prepare(ctx, d, d.in, copy, total, s, 0);
  if (n > 1) ring_reduce_scatter(ctx, w.data, part, w.esize, t.segment_bytes);
  finish_avg(d, w, part.offset[r], part.count[r], n);
  char* mine = w.data + part.offset[r] * w.esize;
  if (is_half(d.dtype)) kernels::convert(d.out, d.dtype, mine, DataType::kFloat32, part.count[r]);
  else if (part.count[r]) std::memmove(d.out, mine, part.count[r] * w.esize);
}

}  // namespace ringcc::algorithms
