// Exact top-k indices along the last axis on the CPU, as an XLA FFI custom call.
//
// The order and the row algorithms are in top_k_row.h; rows are split over XLA's
// intra-op thread pool (row_tasks.h).

#include <cstdint>
#include <memory>

#include "row_tasks.h"
#include "top_k_row.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace sigmoid_moe {
namespace {

ffi::Error TopKImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::S32> out,
                    int64_t k) {
  const auto dims = x.dimensions();
  if (dims.size() < 1) return ffi::Error::InvalidArgument("top_k: x must have rank >= 1");
  const int64_t n = dims.back();
  if (k < 1 || k > n || k > kMaxK) {
    return ffi::Error::InvalidArgument("top_k: k must be in [1, min(n, 64)]");
  }
  const int64_t rows = n == 0 ? 0 : static_cast<int64_t>(x.element_count()) / n;
  const float* data = x.typed_data();
  int32_t* result = out->typed_data();
  ForEachRowRange(pool, rows, n, [=](int64_t begin, int64_t end) {
    std::unique_ptr<int32_t[]> scratch(new int32_t[static_cast<size_t>(n)]);
    for (int64_t r = begin; r < end; ++r) TopKRow(data + r * n, n, k, scratch.get(), result + r * k);
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace sigmoid_moe

XLA_FFI_DEFINE_HANDLER_SYMBOL(SigmoidMoeTopK, sigmoid_moe::TopKImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("k"));
