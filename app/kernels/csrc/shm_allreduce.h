// The shared-memory all-reduce of app/worker/shm_allreduce.py, driven from inside a kernel call.
//
// Same segment, same layout, same rounds: the Python communicator and this one take turns on one
// segment (the embedding and the LM head reduce in Python, the decoder layers here), so the round
// number is not kept in either object but read from this rank's own flag, which only this rank
// writes and which always holds the last round it published. Read that module's docstring for
// the protocol and why one barrier per round is enough.
//
// Reduction order: element e of the result is ((slot[0][e] + slot[1][e]) + slot[2][e]) + ... in
// fp32, on every rank and whichever thread sums it, exactly as the Python side's numpy adds: the
// results are bitwise those of the Python all-reduce. Memory order: the flag is stored with release
// and read with acquire, so this holds for the compiler too, not only by x86's TSO.
//
// A peer that never arrives is an error, never a hang: every wait has the communicator's deadline,
// and past it the round fails (the caller raises CommTimeout) and every later round fails at once.
#pragma once

#include <sched.h>
#include <time.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

#include "thread_pool.h"

namespace ss {

class ShmAllReduce {
 public:
  static constexpr int64_t kMagic = 0x5348524453455256;  // "SHRDSERV"
  static constexpr int64_t kVersion = 1, kLine = 64, kPage = 4096;

  // Returns an empty string when the segment at [base, base + size) is a `world`-rank segment.
  std::string attach(void* base, int64_t size, int rank, int world, double timeout_s) {
    const int64_t* head = static_cast<const int64_t*>(base);
    const int64_t data_off = (kLine + kLine * world + kPage - 1) / kPage * kPage;
    if (base == nullptr || size < data_off || world < 1 || rank < 0 || rank >= world) return "bad segment arguments";
    if (head[0] != kMagic || head[1] != kVersion || head[2] != world) return "not a segment of this world size";
    if (size < data_off + 2 * world * head[3]) return "segment smaller than its slots";
    base_ = static_cast<char*>(base);
    rank_ = rank, world_ = world, slot_bytes_ = head[3], data_off_ = data_off, timeout_s_ = timeout_s;
    return "";
  }

  void detach() { base_ = nullptr; }
  bool attached() const { return base_ != nullptr; }
  int rank() const { return rank_; }
  int world() const { return world_; }
  int64_t capacity() const { return slot_bytes_ / 4; }  // fp32 values per slot
  const std::string& broken() const { return broken_; }

  // The round the next collective of this rank will be.
  int64_t next_round() const { return load(flag(rank_)) + 1; }

  float* slot(int64_t seq, int q) const {
    return reinterpret_cast<float*>(base_ + data_off_ + ((seq & 1) * world_ + q) * slot_bytes_);
  }

  // Round `seq` of `count` fp32 values, this rank's payload already in slot(seq, rank): its shape,
  // the flag, the wait for every peer, the check that all reduce the same count. Called by one
  // thread; the payload may have been written by others of its team before a barrier. Returns ""
  // or the error: "timeout: ..." (then every later round fails too) or "shape: ...".
  std::string exchange(int64_t seq, int64_t count) {
    if (!broken_.empty()) return "timeout: shared-memory communicator unusable after: " + broken_;
    int64_t* line = lines(rank_);
    const int p = static_cast<int>(seq & 1);
    store(line + 1 + p, count);
    store(line + 3 + p, 0);
    __atomic_store_n(line, seq, __ATOMIC_RELEASE);  // after the payload and the shape
    const auto start = std::chrono::steady_clock::now();
    for (int q = 0; q < world_; ++q) {
      if (q == rank_) continue;
      for (int spins = 0; load(flag(q)) < seq; ++spins) {
        if (spins < kSpins) {
          SS_PAUSE();
          continue;
        }
        const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        if (waited > timeout_s_) {
          char msg[128];
          std::snprintf(msg, sizeof msg, "rank %d missed round %lld (waited %.1f s)", q, static_cast<long long>(seq),
                        waited);
          broken_ = msg;
          return "timeout: rank " + std::to_string(rank_) + ": " + broken_;
        }
        // As the Python side: yield while the wait is young (a preempted peer on a shared core gets
        // to run), then sleep, so a long wait does not burn a core others need.
        if (waited < 0.002) {
          sched_yield();
        } else {
          const timespec ts{0, 50000};
          nanosleep(&ts, nullptr);
        }
      }
    }
    for (int q = 0; q < world_; ++q) {
      const int64_t* l = lines(q);
      if (load(l + 1 + p) != count || load(l + 3 + p) != 0) {
        std::string counts;
        for (int r = 0; r < world_; ++r) counts += (r ? ", " : "") + std::to_string(load(lines(r) + 1 + p));
        return "shape: all_reduce numel differs across ranks: [" + counts + "]";
      }
    }
    return "";
  }

  // out[e0, e1) = the rank-order sum of round seq's slots (out may be this rank's own slot).
  void sum(int64_t seq, float* out, int64_t e0, int64_t e1) const {
    const float* a = slot(seq, 0);
    const float* b = slot(seq, world_ > 1 ? 1 : 0);
    if (world_ == 1) {
      if (out != a) std::memcpy(out + e0, a + e0, (e1 - e0) * sizeof(float));
      return;
    }
    for (int64_t e = e0; e < e1; ++e) out[e] = a[e] + b[e];
    for (int q = 2; q < world_; ++q) {
      const float* c = slot(seq, q);
      for (int64_t e = e0; e < e1; ++e) out[e] = out[e] + c[e];
    }
  }

  // The whole collective on one thread, in place, in rounds of at most a slot (as the Python side
  // splits a tensor larger than a slot). Returns "" or exchange's error.
  std::string all_reduce(float* data, int64_t n) {
    const int64_t cap = capacity();
    for (int64_t start = 0; start < (n > 1 ? n : 1); start += cap) {
      const int64_t m = n - start < cap ? n - start : cap;
      const int64_t seq = next_round();
      if (m > 0) std::memcpy(slot(seq, rank_), data + start, m * sizeof(float));
      std::string err = exchange(seq, n);
      if (!err.empty()) return err;
      if (m > 0) sum(seq, data + start, 0, m);
    }
    return "";
  }

 private:
  int64_t* lines(int q) const { return reinterpret_cast<int64_t*>(base_ + kLine + kLine * q); }
  const int64_t* flag(int q) const { return lines(q); }
  static int64_t load(const int64_t* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
  static void store(int64_t* p, int64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }

  char* base_ = nullptr;
  int rank_ = 0, world_ = 1;
  int64_t slot_bytes_ = 0, data_off_ = 0;
  double timeout_s_ = 30.0;
  std::string broken_;
};

}  // namespace ss
