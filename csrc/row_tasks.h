// Splits independent tasks over XLA's intra-op thread pool.
//
// The calling thread and up to (threads - 1) pool threads claim tasks from a shared
// counter, and the caller waits only for tasks that were claimed, so a pool whose threads
// are all busy cannot deadlock it: the caller then runs every task itself. Which thread
// runs a task never changes what it computes, so results do not depend on scheduling.

#ifndef SIGMOID_MOE_ROW_TASKS_H_
#define SIGMOID_MOE_ROW_TASKS_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace sigmoid_moe {

constexpr int64_t kRowsPerTask = 256;
constexpr int64_t kMinElementsToSplit = 1 << 15;

namespace internal {

struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;
};

template <typename TaskFn>
void RunTasks(const std::shared_ptr<Shared>& s, int64_t tasks, const TaskFn* fn) {
  // `fn` is only touched for a claimed task: a helper that starts after the caller
  // returned finds none left.
  for (int64_t t; (t = s->next.fetch_add(1)) < tasks;) {
    (*fn)(t);
    if (s->done.fetch_add(1) + 1 == tasks) {
      std::lock_guard<std::mutex> lock(s->mu);
      s->cv.notify_all();
    }
  }
}

}  // namespace internal

// Calls fn(t) for t in [0, tasks), in increasing claim order, on the calling thread and
// (when `split`) the pool. `fn` must stay valid until this returns (it does: the caller
// waits for every claimed task).
template <typename TaskFn>
void ForEachTask(xla::ffi::ThreadPool& pool, int64_t tasks, bool split, const TaskFn& fn) {
  const int64_t threads = pool.num_threads();
  if (tasks <= 1 || threads <= 1 || !split) {
    for (int64_t t = 0; t < tasks; ++t) fn(t);
    return;
  }
  auto shared = std::make_shared<internal::Shared>();
  const int64_t helpers = std::min<int64_t>(threads, tasks) - 1;
  const TaskFn* f = &fn;
  for (int64_t h = 0; h < helpers; ++h) {
    pool.Schedule([=] { internal::RunTasks(shared, tasks, f); });
  }
  internal::RunTasks(shared, tasks, f);
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done.load() == tasks; });
}

// Calls fn(begin, end) over [0, rows) in tasks of kRowsPerTask rows: on the calling thread
// alone for small inputs (rows * row_length < kMinElementsToSplit), else also on the pool.
template <typename RowsFn>
void ForEachRowRange(xla::ffi::ThreadPool& pool, int64_t rows, int64_t row_length,
                     const RowsFn& fn) {
  const int64_t tasks = (rows + kRowsPerTask - 1) / kRowsPerTask;
  if (tasks <= 1 || rows * row_length < kMinElementsToSplit) {
    fn(0, rows);
    return;
  }
  ForEachTask(pool, tasks, true, [&](int64_t t) {
    const int64_t begin = t * kRowsPerTask;
    fn(begin, std::min(rows, begin + kRowsPerTask));
  });
}

}  // namespace sigmoid_moe

#endif  // SIGMOID_MOE_ROW_TASKS_H_
