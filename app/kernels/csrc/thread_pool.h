// The kernels' threads: a fixed team that spins briefly between calls, then sleeps.
//
// Why not OpenMP: with OMP_WAIT_POLICY=PASSIVE (which the ranks need on shared cores) every
// parallel region costs ~56 us to wake its threads, and a decode step opens ~150 of them. Here a
// call costs ~1 us while the team is spinning; a worker spins for `spin_us` after its last task
// (covering the Python between two kernels of one step), then blocks on a condition variable, so
// threads sleep between steps and never burn a shared core for long.
//
// Work is split statically by the caller (each thread index gets fixed outputs), so which thread
// computes an output never changes its value.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include <climits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SS_PAUSE() _mm_pause()
#else
#define SS_PAUSE() std::this_thread::yield()
#endif

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace ss {

// Sleep while *word == expected (returns at once if it differs), and wake every sleeper on word:
// the slow half of spin-then-sleep waits. Elsewhere than Linux: a yield, which is correct, only
// less kind to a shared core.
inline void futex_wait(std::atomic<uint32_t>& word, uint32_t expected) {
#if defined(__linux__)
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAIT_PRIVATE, expected, nullptr, nullptr, 0);
#else
  (void)word, (void)expected;
  std::this_thread::yield();
#endif
}

inline void futex_wake_all(std::atomic<uint32_t>& word) {
#if defined(__linux__)
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
#else
  (void)word;
#endif
}

// Spins of a wait before it sleeps: ~50 us of PAUSE. A peer on its own core arrives well within
// that; past it the peer was preempted (the cores are shared), and spinning on would only keep it
// from running.
constexpr int kSpins = 1000;

// Work handed out in chunks to whichever thread asks next, inside one ThreadPool::run: a thread
// that was preempted (the cores are shared) no longer holds up the team, and since an output's
// arithmetic never depends on the thread computing it, the results do not change.
class WorkQueue {
 public:
  WorkQueue(int64_t n, int64_t chunk) : n_(n), chunk_(chunk < 1 ? 1 : chunk) {}
  template <typename F>
  void drain(F&& f) {
    for (int64_t b; (b = next_.fetch_add(chunk_, std::memory_order_relaxed)) < n_;) f(b, std::min(n_, b + chunk_));
  }

 private:
  const int64_t n_, chunk_;
  std::atomic<int64_t> next_{0};
};

// A barrier for the team inside one ThreadPool::run: the phases of a fused block.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    if (n_ == 1) return;
    const uint32_t g = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      count_.store(0, std::memory_order_relaxed);
      gen_.fetch_add(1, std::memory_order_seq_cst);
      if (sleepers_.load(std::memory_order_seq_cst) > 0) futex_wake_all(gen_);
      return;
    }
    for (int i = 0; i < kSpins; ++i) {
      if (gen_.load(std::memory_order_acquire) != g) return;
      SS_PAUSE();
    }
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    while (gen_.load(std::memory_order_seq_cst) == g) futex_wait(gen_, g);
    sleepers_.fetch_sub(1, std::memory_order_seq_cst);
  }

 private:
  const int n_;
  std::atomic<int> count_{0};
  std::atomic<uint32_t> gen_{0};
  std::atomic<int> sleepers_{0};
};

class ThreadPool {
 public:
  ThreadPool(int threads, int spin_us) : threads_(threads < 1 ? 1 : threads), spin_us_(spin_us) {
    for (int i = 1; i < threads_; ++i) workers_.emplace_back([this, i] { work(i); });
  }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;
  ~ThreadPool() {
    stop_.store(true);
    {
      std::lock_guard<std::mutex> lock(mu_);
      generation_.fetch_add(1);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  int threads() const { return threads_; }

  // Runs fn(i) for i in [0, threads) — i = 0 on the calling thread — and returns when all are done.
  void run(const std::function<void(int)>& fn) {
    if (threads_ == 1) return fn(0);
    job_ = &fn;
    pending_.store(static_cast<uint32_t>(threads_ - 1), std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      cv_.notify_all();
    }
    fn(0);
    for (int i = 0; i < kSpins && pending_.load(std::memory_order_acquire) != 0; ++i) SS_PAUSE();
    if (pending_.load(std::memory_order_acquire) != 0) {  // a worker was preempted: sleep until it is done
      caller_sleeping_.store(true, std::memory_order_seq_cst);
      for (uint32_t left; (left = pending_.load(std::memory_order_seq_cst)) != 0;) futex_wait(pending_, left);
      caller_sleeping_.store(false, std::memory_order_relaxed);
    }
  }

 private:
  void work(int index) {
    uint64_t seen = 0;
    while (true) {
      if (!wait_for_job(seen)) return;
      seen = generation_.load(std::memory_order_acquire);
      (*job_)(index);
      if (pending_.fetch_sub(1, std::memory_order_seq_cst) == 1 && caller_sleeping_.load(std::memory_order_seq_cst))
        futex_wake_all(pending_);
    }
  }

  // Spin up to spin_us for a new generation, then sleep until one comes; false on shutdown.
  bool wait_for_job(uint64_t seen) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us_);
    for (int i = 0;; ++i) {
      if (generation_.load(std::memory_order_acquire) != seen) return !stop_.load();
      SS_PAUSE();
      if ((i & 63) == 63 && std::chrono::steady_clock::now() > deadline) break;
    }
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return generation_.load(std::memory_order_seq_cst) != seen; });
    }
    sleepers_.fetch_sub(1, std::memory_order_seq_cst);
    return !stop_.load();
  }

  const int threads_;
  const int spin_us_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* job_ = nullptr;
  std::atomic<uint64_t> generation_{0};
  std::atomic<uint32_t> pending_{0};
  std::atomic<bool> caller_sleeping_{false};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::condition_variable cv_;
};

}  // namespace ss
