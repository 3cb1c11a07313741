// The kernels' limits and status codes, in one place: csrc/module.cc hands them to Python
// (sigmoid_moe._native.LIMITS), which reads them instead of copying them.

#ifndef SIGMOID_MOE_KERNEL_LIMITS_H_
#define SIGMOID_MOE_KERNEL_LIMITS_H_

#include <cstdint>

namespace sigmoid_moe {

// Top-k (top_k_row.h) and the route: the largest k; the largest of top_k_row.h's fast row
// path (4 bound vectors).
constexpr int64_t kMaxK = 64;
constexpr int64_t kMaxFastK = 16;

// The route's candidate slots per token (route_cpu.cc), at most, and its row statuses.
constexpr int64_t kMaxCandidates = 128;
constexpr int32_t kNotRouted = 0;
constexpr int32_t kRouted = 1;
constexpr int32_t kTooMany = 2;

// The expert FFN (expert_ffn_cpu.cc): a task works through its expert's rows in chunks of
// at most kChunkRows rows (its per-thread buffers), and the per-row outputs of one wave of
// experts span at most kWaveRowBytes (or one expert's rows) before they are summed.
constexpr int64_t kChunkRows = 256;
constexpr int64_t kWaveRowBytes = int64_t{32} << 20;

}  // namespace sigmoid_moe

#endif  // SIGMOID_MOE_KERNEL_LIMITS_H_
