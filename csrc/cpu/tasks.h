// Dynamic scheduling of a kernel's tiles: one parallel region per call, every thread taking the
// next ready task of a dependency graph until none is left (gram.cpp, infonce.cpp).
//
// Why not one at::parallel_for per pass: that splits the work statically and ends with a barrier,
// so when the cores are shared (DataLoader workers, a second job) a thread that the OS has
// descheduled holds up every other thread at each barrier, hundreds of times per call, and the
// waiting threads' time slices are lost. Here a thread that runs takes whatever task is ready; a
// thread only ever waits for a dependency (asleep on a condition variable, not spinning), and
// the region ends once, after the last task. A thread left without a task sleeps here until the
// last running task has finished, so that every thread reaches the region's closing barrier
// together: that barrier (OpenMP's) spins, and a thread spinning there for the length of a tile
// takes CPU time from the threads still at work when they share a core.
//
// Determinism: a task that updates shared rows (dq of a query block, dkeys of a key chunk) gets
// an edge from the previous task that updates them, so those rows are updated in list order
// whichever thread runs each task: the sums are the same on every run and any thread count.
#pragma once

#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>

namespace fastcontrast {
namespace tiles {

class TaskGraph {
 public:
  explicit TaskGraph(int64_t size)
      : waiting_(static_cast<size_t>(size), 0), after_(static_cast<size_t>(size)),
        started_(static_cast<size_t>(size), 0) {}

  int64_t size() const { return static_cast<int64_t>(started_.size()); }

  // Task `later` starts only once task `earlier` has finished.
  void add_edge(int64_t earlier, int64_t later) {
    after_[earlier].push_back(later);
    ++waiting_[later];
  }

  // An edge from the previous task (if any) of every resource in `uses` to task t, t then the
  // previous task of each: tasks that update the same rows run in the order they are added.
  void chain(int64_t t, std::vector<int64_t>& last, std::initializer_list<int64_t> uses) {
    for (const int64_t r : uses) {
      if (last[r] >= 0 && last[r] != t) add_edge(last[r], t);
      last[r] = t;
    }
  }

  // The first task (in list order) not yet started whose dependencies have all finished, now
  // marked started; waits while none is ready but some is still running; -1 once every task has
  // finished or one failed.
  int64_t acquire() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      if (failed_ || finished_ == size()) return -1;
      while (first_open_ < size() && started_[first_open_]) ++first_open_;
      for (int64_t t = first_open_; t < size(); ++t) {
        if (started_[t] || waiting_[t] != 0) continue;
        started_[t] = 1;
        return t;
      }
      wake_.wait(lock);
    }
  }

  void release(int64_t t) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      for (const int64_t later : after_[t]) --waiting_[later];
      ++finished_;
    }
    wake_.notify_all();
  }

  void fail() {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      failed_ = true;
    }
    wake_.notify_all();
  }

  // Runs fn(t, slot) for every task on every thread of one parallel region; slot in
  // [0, threads) is the calling thread's (for per-thread buffers). A task that throws stops the
  // others, and the exception reaches the caller. leave(slot) as each thread stops taking tasks.
  template <typename Fn>
  void run(Fn&& fn) {
    run(std::forward<Fn>(fn), [](int64_t) {});
  }

  template <typename Fn, typename Leave>
  void run(Fn&& fn, Leave&& leave) {
    const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), size()));
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      // A worker thread starts in grad mode, and the ATen calls of the tasks see operands that
      // require grad (the op runs inside an autograd.Function): no graph in here.
      const c10::AutoGradMode no_grad(false);
      // begin: the slot (one per thread; end - begin > 1 only when parallel_for runs inline).
      (void)end;
      for (int64_t t; (t = acquire()) >= 0;) {
        try {
          fn(t, begin);
        } catch (...) {
          fail();
          throw;
        }
        release(t);
      }
      leave(begin);
    });
  }

 private:
  std::vector<int64_t> waiting_;             // unfinished dependencies of each task
  std::vector<std::vector<int64_t>> after_;  // the tasks that wait for each task
  std::vector<char> started_;
  int64_t first_open_ = 0;
  int64_t finished_ = 0;
  bool failed_ = false;
  std::mutex mutex_;
  std::condition_variable wake_;
};

// An order of the tiles (b, c) of a grid of nb query blocks by nc key chunks in which
// consecutive tiles share neither their block nor their chunk where the grid allows: rounds of
// min(nb, nc) tiles, tile (b, (b + r) mod nc) in round r (or ((c + r) mod nb, c) when nb > nc).
// With the chain edges of TaskGraph (a block's and a chunk's tiles in this order) every round's
// tiles are independent of each other.
inline std::vector<std::pair<int64_t, int64_t>> grid_order(int64_t nb, int64_t nc) {
  std::vector<std::pair<int64_t, int64_t>> order;
  order.reserve(static_cast<size_t>(nb * nc));
  if (nb <= nc) {
    for (int64_t r = 0; r < nc; ++r)
      for (int64_t b = 0; b < nb; ++b) order.emplace_back(b, (b + r) % nc);
  } else {
    for (int64_t r = 0; r < nb; ++r)
      for (int64_t c = 0; c < nc; ++c) order.emplace_back((c + r) % nb, c);
  }
  return order;
}

}  // namespace tiles
}  // namespace fastcontrast
