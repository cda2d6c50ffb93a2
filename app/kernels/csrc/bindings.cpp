// Python bindings of the kernels: shape and dtype checks, the ISA choice and the thread split.
// The only translation unit that includes torch; the kernels themselves are in kernels_impl.h.
#include <cpuid.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <utility>
#include <string>

#include "kernel_args.h"
#include "shm_allreduce.h"
#include "thread_pool.h"

namespace ss {
const IsaOps* avx2_ops();
const IsaOps* avx512_ops();
const IsaOps* avx512vnni_ops();
}  // namespace ss

namespace {

// What the CPU and the OS both allow (XGETBV: the OS saves the YMM / ZMM state on context switch).
struct CpuFeatures {
  bool avx2 = false, avx512 = false, avx512vnni = false;
};

CpuFeatures cpu_features() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28), f16c = c & (1u << 29);
  if (!(osxsave && avx && fma && f16c)) return f;
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  const bool ymm = (lo & 0x6) == 0x6, zmm = (lo & 0xe6) == 0xe6;
  if (!ymm || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  f.avx2 = b & (1u << 5);
  f.avx512 = f.avx2 && zmm && (b & (1u << 16));
  f.avx512vnni = f.avx512 && (b & (1u << 30)) && (c & (1u << 11));  // AVX512BW, AVX512_VNNI
  return f;
}

int weight_format(const at::Tensor& w) {
  switch (w.scalar_type()) {
    case at::kFloat: return ss::W_F32;
    case at::kBFloat16: return ss::W_BF16;
    case at::kHalf: return ss::W_F16;
    case at::kChar: return ss::W_I8;
    default: TORCH_CHECK_TYPE(false, "unsupported weight dtype ", w.scalar_type());
  }
}

// A weight as the kernels see it: [N, K] of any weight dtype, or int8 packed [N / 4, K / 16, 4, 16].
struct WeightView {
  const void* ptr;
  int fmt;
  int64_t N, K;
};

WeightView weight_view(const at::Tensor& w, const char* name) {
  TORCH_CHECK(w.device().is_cpu() && w.is_contiguous(), name, " weight must be a contiguous CPU tensor");
  if (w.dim() == 4) {
    TORCH_CHECK(w.scalar_type() == at::kChar && w.size(2) == ss::kPackRows && w.size(3) == 16, name,
                " weight: a 4-d weight must be int8 packed [N / 4, K / 16, 4, 16]");
    return {w.data_ptr(), ss::W_I8_PACKED, w.size(0) * ss::kPackRows, w.size(1) * 16};
  }
  TORCH_CHECK(w.dim() == 2, name, " weight must be a matrix");
  return {w.data_ptr(), weight_format(w), w.size(0), w.size(1)};
}

void check(const at::Tensor& t, at::ScalarType dtype, int64_t dim, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got ", t.dim());
}

// Thread i's share [begin, end) of n items, in whole units of `align`.
std::pair<int64_t, int64_t> share(int64_t n, int i, int threads, int64_t align = 1) {
  const int64_t per = (n + threads * align - 1) / (threads * align) * align;
  const int64_t b = std::min<int64_t>(n, i * per);
  return {b, std::min<int64_t>(n, b + per)};
}

const float* opt_ptr(const c10::optional<at::Tensor>& t, int64_t n, const char* name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == at::kFloat && t->numel() == n,
              name, " must be a contiguous float32 tensor of ", n, " values");
  return t->data_ptr<float>();
}

// A linear layer's tensors as the kernel takes them (x and y are filled in per call).
ss::LinearArgs linear_args(const at::Tensor& w, const c10::optional<at::Tensor>& scale,
                           const c10::optional<at::Tensor>& bias, int64_t K, const char* name) {
  const WeightView wv = weight_view(w, name);
  TORCH_CHECK(wv.K == K, name, " weight has ", wv.K, " inputs, expected ", K);
  const int64_t N = wv.N;
  ss::LinearArgs a{nullptr, 0, K, wv.ptr, wv.fmt, opt_ptr(scale, N, name), nullptr, N};
  a.bias = opt_ptr(bias, N, name);
  return a;
}

// Every position a row attends must lie in its table and every block it names in the cache: the
// kernel reads without bounds checks, so a wrong plan is an error here, never a stray read.
void check_pages(const at::Tensor& tables, const at::Tensor& row_seq, const at::Tensor& row_len, int64_t slots,
                 int64_t block_size) {
  TORCH_CHECK(block_size > 0, "block_size must be positive");
  const int64_t B = tables.size(0), width = tables.size(1), blocks = slots / block_size;
  const int32_t* tb = tables.data_ptr<int32_t>();
  const int32_t* seq = row_seq.data_ptr<int32_t>();
  const int32_t* len = row_len.data_ptr<int32_t>();
  for (int64_t t = 0; t < row_seq.size(0); ++t) {
    TORCH_CHECK(len[t] >= 0 && len[t] <= width * block_size, "row ", t, " attends ", len[t], " positions past its table");
    if (len[t] == 0) continue;
    TORCH_CHECK(seq[t] >= 0 && seq[t] < B, "row ", t, " names sequence ", seq[t], " of ", B);
    const int64_t used = (len[t] + block_size - 1) / block_size;
    for (int64_t j = 0; j < used; ++j) {
      const int32_t b = tb[seq[t] * width + j];
      TORCH_CHECK(b >= 0 && b < blocks, "KV block ", b, " outside the cache of ", blocks);
    }
  }
}

// A rank's handle on the shared-memory all-reduce segment of app/worker/shm_allreduce.py (mapped
// by that module, which owns it and detaches this handle before unmapping): what layer_block reduces
// through. Its own all_reduce is the same collective on the calling thread, in place.
class SharedAllReduce {
 public:
  SharedAllReduce(uint64_t address, int64_t size, int rank, int world, double timeout_s, py::object timeout_error)
      : timeout_error_(std::move(timeout_error)) {
    const std::string err = shm.attach(reinterpret_cast<void*>(address), size, rank, world, timeout_s);
    TORCH_CHECK(err.empty(), "shared-memory all-reduce: ", err);
  }

  void all_reduce(at::Tensor& t) {
    check(t, at::kFloat, t.dim(), "t");
    TORCH_CHECK(shm.attached(), "the shared-memory all-reduce is closed");
    std::string err;
    {
      py::gil_scoped_release nogil;
      err = shm.all_reduce(t.data_ptr<float>(), t.numel());
    }
    if (!err.empty()) raise(err);
  }

  // exchange()'s errors as the Python side raises them: CommTimeout (the class it handed us) or
  // ValueError. Called with the GIL held.
  [[noreturn]] void raise(const std::string& err) const {
    if (err.rfind("timeout: ", 0) == 0) {
      PyErr_SetString(timeout_error_.ptr(), err.c_str() + 9);
      throw py::error_already_set();
    }
    throw py::value_error(err.rfind("shape: ", 0) == 0 ? err.substr(7) : err);
  }

  ss::ShmAllReduce shm;

 private:
  py::object timeout_error_;
};

class Kernels {
 public:
  Kernels(const std::string& isa, int threads, int spin_us) : pool_(threads, spin_us) {
    const CpuFeatures f = cpu_features();
    if (isa == "avx512vnni") {
      TORCH_CHECK(f.avx512vnni, "this CPU (or OS) does not support AVX-512 VNNI");
      ops_ = ss::avx512vnni_ops();
    } else if (isa == "avx512") {
      TORCH_CHECK(f.avx512, "this CPU (or OS) does not support AVX-512F");
      ops_ = ss::avx512_ops();
    } else if (isa == "avx2") {
      TORCH_CHECK(f.avx2, "this CPU (or OS) does not support AVX2 + FMA + F16C");
      ops_ = ss::avx2_ops();
    } else {
      TORCH_CHECK(false, "unknown ISA '", isa, "' (avx512vnni, avx512 or avx2)");
    }
  }

  std::string isa() const { return ops_->name; }
  int threads() const { return pool_.threads(); }

  void linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& scale, at::Tensor& out) {
    check(x, at::kFloat, 2, "x");
    const WeightView wv = weight_view(w, "linear");
    check(out, at::kFloat, 2, "out");
    const int64_t M = x.size(0), K = x.size(1), N = wv.N;
    TORCH_CHECK(wv.K == K, "weight has ", wv.K, " inputs, x has ", K);
    TORCH_CHECK(out.size(0) == M && out.size(1) == N, "out must be [", M, ", ", N, "]");
    ss::LinearArgs a{x.data_ptr<float>(), M, K, wv.ptr, wv.fmt, nullptr, out.data_ptr<float>(), N};
    if (scale.has_value()) {
      check(*scale, at::kFloat, 1, "scale");
      TORCH_CHECK(scale->size(0) == N, "scale must have ", N, " values");
      a.scale = scale->data_ptr<float>();
    }
    if (M == 0 || N == 0) return;
    at::Tensor xq, xd;
    const bool q8 = int8_activations(a, xq, xd);
    py::gil_scoped_release nogil;
    ss::WorkQueue outputs = linear_queue(a);
    in_team([&](int i, int T, ss::Barrier& barrier) {
      quantize_phase(a, q8, i, T, barrier);
      outputs.drain([&](int64_t n0, int64_t n1) { ops_->linear(a, n0, n1); });
    });
  }

  void attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                 const at::Tensor& tables, const at::Tensor& row_seq, const at::Tensor& row_len,
                 int64_t block_size, double scale, at::Tensor& out) {
    check(q, at::kFloat, 3, "q");
    check(out, at::kFloat, 3, "out");
    TORCH_CHECK(out.sizes() == q.sizes(), "out must have q's shape");
    const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_cache.dim() > 1 ? k_cache.size(1) : 0;
    at::Tensor partials;
    const ss::AttentionArgs a = attention_args(q.data_ptr<float>(), T, Hq, Hkv, D, k_cache, v_cache, tables, row_seq,
                                               row_len, block_size, scale, out.data_ptr<float>(), partials);
    if (T == 0) return;
    py::gil_scoped_release nogil;
    ss::WorkQueue parts(T * Hkv * a.max_parts, 1), merges(T * Hkv, 1);
    in_team([&](int, int, ss::Barrier& barrier) { attention_phase(a, parts, merges, barrier); });
  }

  void norm(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, double eps,
            at::Tensor& out) {
    check(x, at::kFloat, 2, "x");
    check(out, at::kFloat, 2, "out");
    check(weight, at::kFloat, 1, "weight");
    const int64_t M = x.size(0), H = x.size(1);
    TORCH_CHECK(weight.size(0) == H && out.sizes() == x.sizes(), "norm shapes disagree");
    ss::NormArgs a{x.data_ptr<float>(), M, H, weight.data_ptr<float>(), nullptr, static_cast<float>(eps),
                   out.data_ptr<float>()};
    if (bias.has_value()) {
      check(*bias, at::kFloat, 1, "bias");
      a.bias = bias->data_ptr<float>();
    }
    py::gil_scoped_release nogil;
    if (M < 4) return ops_->norm(a, 0, M);  // a row or three: not worth waking the team
    const int T = pool_.threads();
    pool_.run([&](int i) { ops_->norm(a, M * i / T, M * (i + 1) / T); });
  }

  void kv_write(const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots, at::Tensor& k_cache,
                at::Tensor& v_cache) {
    check(k, at::kFloat, 3, "k");
    check(v, at::kFloat, 3, "v");
    check(slots, at::kLong, 1, "slots");
    const int64_t Hkv = k.size(1), D = k.size(2), bs = v_cache.dim() == 4 ? v_cache.size(2) : 0;
    const bool f16 = check_cache(k_cache, v_cache, Hkv, D, bs);
    const int64_t T = slots.size(0);
    TORCH_CHECK(k.size(0) >= T && v.sizes() == k.sizes(), "kv_write shapes disagree");
    check_slots(slots, k_cache.size(0) * bs);
    ss::KvWriteArgs a{k.data_ptr<float>(), v.data_ptr<float>(), T, Hkv, D, bs, slots.data_ptr<int64_t>(),
                      k_cache.data_ptr(), v_cache.data_ptr(), f16};
    py::gil_scoped_release nogil;
    ops_->kv_write(a, 0, T);
  }

  // One decoder layer's attention half in one parallel region: [x += residual (+ bias)], h =
  // RMSNorm(x), qkv = h W^T (+ b), rotary + KV write, paged attention, y = o W_o^T. Returns y, the
  // o_proj output before any all-reduce (its bias, if any, is the next block's residual bias).
  at::Tensor attn_block(at::Tensor& x, const c10::optional<at::Tensor>& residual,
                        const c10::optional<at::Tensor>& residual_bias, const at::Tensor& norm_w, double eps,
                        const at::Tensor& qkv_w, const c10::optional<at::Tensor>& qkv_scale,
                        const c10::optional<at::Tensor>& qkv_bias, int64_t Hq, int64_t Hkv, int64_t D,
                        const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                        const at::Tensor& slots, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& tables,
                        const at::Tensor& row_seq, const at::Tensor& row_len, int64_t block_size, double scale,
                        const at::Tensor& o_w, const c10::optional<at::Tensor>& o_scale) {
    AttnHalf a = attn_half(x, residual, residual_bias, norm_w, eps, qkv_w, qkv_scale, qkv_bias, Hq, Hkv, D, positions,
                           cos, sin, slots, k_cache, v_cache, tables, row_seq, row_len, block_size, scale, o_w,
                           o_scale, nullptr);
    if (a.norm.M == 0) return a.y;
    py::gil_scoped_release nogil;
    AttnQueues q = attn_queues(a);
    in_team([&](int i, int T, ss::Barrier& barrier) { attn_phases(a, q, i, T, barrier); });
    return a.y;
  }

  // The MLP half: [x += residual (+ bias)], h = RMSNorm(x), gu = h W^T (+ b), a = silu(gate) * up,
  // y = a W_down^T. Returns y before any all-reduce.
  at::Tensor mlp_block(at::Tensor& x, const c10::optional<at::Tensor>& residual,
                       const c10::optional<at::Tensor>& residual_bias, const at::Tensor& norm_w, double eps,
                       const at::Tensor& gu_w, const c10::optional<at::Tensor>& gu_scale,
                       const c10::optional<at::Tensor>& gu_bias, const at::Tensor& down_w,
                       const c10::optional<at::Tensor>& down_scale) {
    MlpHalf m = mlp_half(x, residual, residual_bias, norm_w, eps, gu_w, gu_scale, gu_bias, down_w, down_scale, nullptr);
    if (m.norm.M == 0) return m.y;
    py::gil_scoped_release nogil;
    MlpQueues q = mlp_queues(m);
    in_team([&](int i, int T, ss::Barrier& barrier) { mlp_phases(m, q, i, T, barrier); });
    return m.y;
  }

  // A whole decoder layer in one parallel region: the attention half, o_proj's all-reduce, the MLP
  // half (whose residual is that sum plus o_bias), down_proj's all-reduce. Returns the down_proj sum:
  // the next layer's residual (x has this layer's first residual added in place).
  //
  // The collectives of the kernel path are these two, named here and nowhere else (the torch path
  // keeps STYLE.md's visible all_reduce after each row-parallel layer): `comm` is this rank's handle
  // on the shared-memory segment (SharedAllReduce), None at TP=1. Each row-parallel linear writes
  // its partial sums straight into this rank's slot of the round, thread 0 publishes and waits for
  // the peers while the team waits at the barrier, then every thread sums its share of the elements
  // in rank order.
  at::Tensor layer_block(at::Tensor& x, const c10::optional<at::Tensor>& residual,
                         const c10::optional<at::Tensor>& residual_bias, const at::Tensor& norm_w, double eps,
                         const at::Tensor& qkv_w, const c10::optional<at::Tensor>& qkv_scale,
                         const c10::optional<at::Tensor>& qkv_bias, int64_t Hq, int64_t Hkv, int64_t D,
                         const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                         const at::Tensor& slots, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& tables,
                         const at::Tensor& row_seq, const at::Tensor& row_len, int64_t block_size, double scale,
                         const at::Tensor& o_w, const c10::optional<at::Tensor>& o_scale,
                         const c10::optional<at::Tensor>& o_bias, const at::Tensor& mlp_norm_w, double mlp_eps,
                         const at::Tensor& gu_w, const c10::optional<at::Tensor>& gu_scale,
                         const c10::optional<at::Tensor>& gu_bias, const at::Tensor& down_w,
                         const c10::optional<at::Tensor>& down_scale, SharedAllReduce* comm) {
    check(x, at::kFloat, 2, "x");
    const int64_t M = x.size(0), H = x.size(1), n = M * H;
    ss::ShmAllReduce* ar = nullptr;
    if (comm != nullptr) {
      TORCH_CHECK(comm->shm.attached(), "the shared-memory all-reduce is closed");
      TORCH_CHECK(n <= comm->shm.capacity(), "layer_block: ", n, " values exceed the shared slot of ",
                  comm->shm.capacity(), " (reduce in rounds through the Python communicator)");
      if (comm->shm.world() > 1) ar = &comm->shm;
    }
    const int64_t seq = ar ? ar->next_round() : 0;
    AttnHalf a = attn_half(x, residual, residual_bias, norm_w, eps, qkv_w, qkv_scale, qkv_bias, Hq, Hkv, D, positions,
                           cos, sin, slots, k_cache, v_cache, tables, row_seq, row_len, block_size, scale, o_w,
                           o_scale, ar ? ar->slot(seq, ar->rank()) : nullptr);
    TORCH_CHECK(a.o.N == H, "o_proj has ", a.o.N, " outputs for rows of ", H);
    const at::Tensor attn_sum = ar ? at::empty({M, H}, x.options()) : a.y;
    MlpHalf m = mlp_half(x, attn_sum, o_bias, mlp_norm_w, mlp_eps, gu_w, gu_scale, gu_bias, down_w, down_scale,
                         ar ? ar->slot(seq + 1, ar->rank()) : nullptr);
    TORCH_CHECK(m.down.N == H, "down_proj has ", m.down.N, " outputs for rows of ", H);
    at::Tensor out = ar ? at::empty({M, H}, x.options()) : m.y;
    std::string err;
    {
      py::gil_scoped_release nogil;
      if (M == 0) {  // no work, but the peers still count two rounds
        if (ar && (err = ar->exchange(seq, 0)).empty()) err = ar->exchange(seq + 1, 0);
      } else {
        AttnQueues aq = attn_queues(a);
        MlpQueues mq = mlp_queues(m);
        float* attn_out = attn_sum.data_ptr<float>();
        float* layer_out = out.data_ptr<float>();
        in_team([&](int i, int T, ss::Barrier& barrier) {
          attn_phases(a, aq, i, T, barrier);
          if (ar == nullptr) {
            barrier.wait();  // o_proj's outputs are split by column, the MLP's norm by row
          } else if (!reduce_phase(*ar, seq, attn_out, n, i, T, barrier, err)) {
            return;
          }
          mlp_phases(m, mq, i, T, barrier);
          if (ar != nullptr) reduce_phase(*ar, seq + 1, layer_out, n, i, T, barrier, err);
        });
      }
    }
    if (!err.empty()) comm->raise(err);
    return out;
  }

  // The final norm: [x += residual (+ bias)], then RMSNorm (bias None) or LayerNorm.
  at::Tensor add_norm(at::Tensor& x, const c10::optional<at::Tensor>& residual,
                      const c10::optional<at::Tensor>& residual_bias, const at::Tensor& weight,
                      const c10::optional<at::Tensor>& bias, double eps) {
    check(x, at::kFloat, 2, "x");
    ss::NormArgs a = norm_args(x, residual, residual_bias, weight, eps);
    a.bias = opt_ptr(bias, x.size(1), "bias");
    at::Tensor out = at::empty_like(x);
    a.y = out.data_ptr<float>();
    py::gil_scoped_release nogil;
    ops_->norm(a, 0, a.M);
    return out;
  }

 private:
  // A layer's attention half as the kernels take it, with every buffer it writes (kept alive here).
  struct AttnHalf {
    ss::NormArgs norm;
    ss::LinearArgs qkv, o;
    ss::RopeKvArgs rope;
    ss::AttentionArgs attn;
    bool qkv_q8 = false, o_q8 = false;
    at::Tensor h, qkv_out, q, att, partials, y, qkv_xq, qkv_xd, o_xq, o_xd;
  };
  struct AttnQueues {
    ss::WorkQueue qkv, parts, merge, o;
  };

  // o_proj writes to `y_out` when set (a shared-memory slot), else to a new tensor `y`.
  AttnHalf attn_half(at::Tensor& x, const c10::optional<at::Tensor>& residual,
                     const c10::optional<at::Tensor>& residual_bias, const at::Tensor& norm_w, double eps,
                     const at::Tensor& qkv_w, const c10::optional<at::Tensor>& qkv_scale,
                     const c10::optional<at::Tensor>& qkv_bias, int64_t Hq, int64_t Hkv, int64_t D,
                     const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slots,
                     at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& tables, const at::Tensor& row_seq,
                     const at::Tensor& row_len, int64_t block_size, double scale, const at::Tensor& o_w,
                     const c10::optional<at::Tensor>& o_scale, float* y_out) const {
    check(x, at::kFloat, 2, "x");
    const int64_t M = x.size(0), H = x.size(1), W = (Hq + 2 * Hkv) * D;
    AttnHalf a;
    a.norm = norm_args(x, residual, residual_bias, norm_w, eps);
    a.qkv = linear_args(qkv_w, qkv_scale, qkv_bias, H, "qkv");
    TORCH_CHECK(a.qkv.N == W, "qkv weight has ", a.qkv.N, " outputs, heads need ", W);
    a.o = linear_args(o_w, o_scale, c10::nullopt, Hq * D, "o_proj");
    check(positions, at::kLong, 1, "positions");
    check(slots, at::kLong, 1, "slots");
    check(cos, at::kFloat, 2, "cos");
    check(sin, at::kFloat, 2, "sin");
    TORCH_CHECK(positions.size(0) == M && slots.size(0) == M && cos.size(1) == D && sin.sizes() == cos.sizes(),
                "rotary shapes disagree");
    a.att = at::empty({M, Hq, D}, x.options());
    a.attn = attention_args(nullptr, M, Hq, Hkv, D, k_cache, v_cache, tables, row_seq, row_len, block_size, scale,
                            a.att.data_ptr<float>(), a.partials);
    check_slots(slots, k_cache.size(0) * block_size);
    const int64_t* pos = positions.data_ptr<int64_t>();
    for (int64_t t = 0; t < M; ++t) TORCH_CHECK(pos[t] >= 0 && pos[t] < cos.size(0), "position ", pos[t], " past the rotary table");

    auto f32 = x.options();
    a.h = at::empty({M, H}, f32), a.qkv_out = at::empty({M, W}, f32), a.q = at::empty({M, Hq, D}, f32);
    if (y_out == nullptr) a.y = at::empty({M, a.o.N}, f32);
    a.norm.y = a.h.data_ptr<float>();
    a.qkv.x = a.norm.y, a.qkv.M = M, a.qkv.y = a.qkv_out.data_ptr<float>();
    a.rope = ss::RopeKvArgs{a.qkv.y, M, Hq, Hkv, D, pos, cos.data_ptr<float>(), sin.data_ptr<float>(),
                            a.q.data_ptr<float>(), slots.data_ptr<int64_t>(), block_size, k_cache.data_ptr(),
                            v_cache.data_ptr(), a.attn.kv_f16};
    a.attn.q = a.rope.q_out;
    a.o.x = a.attn.out, a.o.M = M, a.o.y = y_out != nullptr ? y_out : a.y.data_ptr<float>();
    if (M == 0) return a;
    a.qkv_q8 = int8_activations(a.qkv, a.qkv_xq, a.qkv_xd);
    a.o_q8 = int8_activations(a.o, a.o_xq, a.o_xd);
    return a;
  }

  AttnQueues attn_queues(const AttnHalf& a) const {
    const int64_t parts = a.norm.M * a.attn.Hkv;
    return AttnQueues{linear_queue(a.qkv), ss::WorkQueue(parts * a.attn.max_parts, 1), ss::WorkQueue(parts, 1),
                      linear_queue(a.o)};
  }

  // Thread i's part of the attention half, inside a parallel region; ends without a barrier.
  void attn_phases(const AttnHalf& a, AttnQueues& q, int i, int T, ss::Barrier& barrier) const {
    auto rows = share(a.norm.M, i, T);
    ops_->norm(a.norm, rows.first, rows.second);
    if (a.qkv_q8) ops_->quantize(a.qkv, rows.first, rows.second);  // the rows this thread normalised
    barrier.wait();
    q.qkv.drain([&](int64_t n0, int64_t n1) { ops_->linear(a.qkv, n0, n1); });
    barrier.wait();
    ops_->rope_kv(a.rope, rows.first, rows.second);
    barrier.wait();
    attention_phase(a.attn, q.parts, q.merge, barrier);
    barrier.wait();
    quantize_phase(a.o, a.o_q8, i, T, barrier);
    q.o.drain([&](int64_t n0, int64_t n1) { ops_->linear(a.o, n0, n1); });
  }

  struct MlpHalf {
    ss::NormArgs norm;
    ss::LinearArgs gu, down;
    ss::SiluMulArgs silu;
    bool gu_q8 = false, down_q8 = false;
    at::Tensor h, gu_out, act, y, gu_xq, gu_xd, down_xq, down_xd;
  };
  struct MlpQueues {
    ss::WorkQueue gu, down;
  };

  // down_proj writes to `y_out` when set (a shared-memory slot), else to a new tensor `y`.
  MlpHalf mlp_half(at::Tensor& x, const c10::optional<at::Tensor>& residual,
                   const c10::optional<at::Tensor>& residual_bias, const at::Tensor& norm_w, double eps,
                   const at::Tensor& gu_w, const c10::optional<at::Tensor>& gu_scale,
                   const c10::optional<at::Tensor>& gu_bias, const at::Tensor& down_w,
                   const c10::optional<at::Tensor>& down_scale, float* y_out) const {
    check(x, at::kFloat, 2, "x");
    const int64_t M = x.size(0), H = x.size(1);
    MlpHalf m;
    m.norm = norm_args(x, residual, residual_bias, norm_w, eps);
    m.gu = linear_args(gu_w, gu_scale, gu_bias, H, "gate_up");
    TORCH_CHECK(m.gu.N % 2 == 0, "gate_up must have an even number of outputs");
    const int64_t I = m.gu.N / 2;
    m.down = linear_args(down_w, down_scale, c10::nullopt, I, "down");
    auto f32 = x.options();
    m.h = at::empty({M, H}, f32), m.gu_out = at::empty({M, 2 * I}, f32), m.act = at::empty({M, I}, f32);
    if (y_out == nullptr) m.y = at::empty({M, m.down.N}, f32);
    m.norm.y = m.h.data_ptr<float>();
    m.gu.x = m.norm.y, m.gu.M = M, m.gu.y = m.gu_out.data_ptr<float>();
    m.silu = ss::SiluMulArgs{m.gu.y, M, I, m.act.data_ptr<float>()};
    m.down.x = m.silu.out, m.down.M = M, m.down.y = y_out != nullptr ? y_out : m.y.data_ptr<float>();
    if (M == 0) return m;
    m.gu_q8 = int8_activations(m.gu, m.gu_xq, m.gu_xd);
    m.down_q8 = int8_activations(m.down, m.down_xq, m.down_xd);
    return m;
  }

  MlpQueues mlp_queues(const MlpHalf& m) const { return MlpQueues{linear_queue(m.gu), linear_queue(m.down)}; }

  // Thread i's part of the MLP half, inside a parallel region; ends without a barrier.
  void mlp_phases(const MlpHalf& m, MlpQueues& q, int i, int T, ss::Barrier& barrier) const {
    auto rows = share(m.norm.M, i, T);
    ops_->norm(m.norm, rows.first, rows.second);
    if (m.gu_q8) ops_->quantize(m.gu, rows.first, rows.second);
    barrier.wait();
    q.gu.drain([&](int64_t n0, int64_t n1) { ops_->linear(m.gu, n0, n1); });
    barrier.wait();
    auto elems = share(m.norm.M * m.silu.I, i, T, 16);
    ops_->silu_mul(m.silu, elems.first, elems.second);
    barrier.wait();
    quantize_phase(m.down, m.down_q8, i, T, barrier);
    q.down.drain([&](int64_t n0, int64_t n1) { ops_->linear(m.down, n0, n1); });
  }

  // Inside a parallel region, once this rank's partial sums are (being) written to its slot of round
  // `seq`: thread 0 runs the round while the others wait at the barrier, then each thread sums its
  // share of the elements into out. False (the same for every thread) when the round failed.
  static bool reduce_phase(ss::ShmAllReduce& ar, int64_t seq, float* out, int64_t n, int i, int T,
                           ss::Barrier& barrier, std::string& err) {
    barrier.wait();  // the payload is complete
    if (i == 0) err = ar.exchange(seq, n);
    barrier.wait();
    if (!err.empty()) return false;
    auto elems = share(n, i, T, 16);
    ar.sum(seq, out, elems.first, elems.second);
    barrier.wait();
    return true;
  }

  // A linear layer's outputs in whole tiles, about eight chunks per thread.
  ss::WorkQueue linear_queue(const ss::LinearArgs& a) const {
    const int64_t nr = ops_->linear_nr;
    return ss::WorkQueue(a.N, std::max<int64_t>(nr, a.N / (8 * pool_.threads()) / nr * nr));
  }

  ss::NormArgs norm_args(at::Tensor& x, const c10::optional<at::Tensor>& residual,
                         const c10::optional<at::Tensor>& residual_bias, const at::Tensor& w, double eps) const {
    const int64_t M = x.size(0), H = x.size(1);
    check(w, at::kFloat, 1, "norm weight");
    TORCH_CHECK(w.size(0) == H, "norm weight has ", w.size(0), " values for rows of ", H);
    ss::NormArgs a{x.data_ptr<float>(), M, H, w.data_ptr<float>(), nullptr, static_cast<float>(eps), nullptr};
    a.residual = opt_ptr(residual, M * H, "residual");
    a.residual_bias = opt_ptr(residual_bias, H, "residual bias");
    return a;
  }

  // The kernels' cache layout (csrc/kernel_args.h): K [blocks, Hkv, D, block_size], V [blocks, Hkv,
  // block_size, D]; returns whether it is fp16.
  static bool check_cache(const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t Hkv, int64_t D,
                          int64_t block_size) {
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4 && v_cache.dim() == 4 &&
                    k_cache.scalar_type() == v_cache.scalar_type(),
                "the KV cache must be two contiguous 4-d tensors of one dtype");
    TORCH_CHECK(block_size > 0 && k_cache.sizes() == at::IntArrayRef({v_cache.size(0), Hkv, D, block_size}) &&
                    v_cache.sizes() == at::IntArrayRef({k_cache.size(0), Hkv, block_size, D}),
                "the KV cache must be K [blocks, ", Hkv, ", ", D, ", ", block_size, "] and V [blocks, ", Hkv, ", ",
                block_size, ", ", D, "]");
    const bool f16 = k_cache.scalar_type() == at::kHalf;
    TORCH_CHECK(f16 || k_cache.scalar_type() == at::kFloat, "the KV cache must be float32 or float16");
    return f16;
  }

  // Everything the attention kernel reads without bounds checks, for both entry points, and room for
  // the partitions of rows longer than one (`partials` holds that buffer).
  static ss::AttentionArgs attention_args(const float* q, int64_t rows, int64_t Hq, int64_t Hkv, int64_t D,
                                          const at::Tensor& k_cache, const at::Tensor& v_cache,
                                          const at::Tensor& tables, const at::Tensor& row_seq,
                                          const at::Tensor& row_len, int64_t block_size, double scale, float* out,
                                          at::Tensor& partials) {
    TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "q heads must be a multiple of KV heads");
    TORCH_CHECK(D <= 256, "head_dim above 256 is not supported");
    const bool f16 = check_cache(k_cache, v_cache, Hkv, D, block_size);
    check(tables, at::kInt, 2, "tables");
    check(row_seq, at::kInt, 1, "row_seq");
    check(row_len, at::kInt, 1, "row_len");
    TORCH_CHECK(row_seq.size(0) == rows && row_len.size(0) == rows, "row_seq and row_len need one value per row");
    check_pages(tables, row_seq, row_len, k_cache.size(0) * block_size, block_size);
    ss::AttentionArgs a{q, rows, Hq, Hkv, D, k_cache.data_ptr(), v_cache.data_ptr(), f16,
                        tables.data_ptr<int32_t>(), tables.size(1), row_seq.data_ptr<int32_t>(),
                        row_len.data_ptr<int32_t>(), block_size, static_cast<float>(scale), out};
    const int32_t* len = row_len.data_ptr<int32_t>();
    for (int64_t t = 0; t < rows; ++t)
      a.max_parts = std::max<int64_t>(a.max_parts, (len[t] + ss::kAttnPartition - 1) / ss::kAttnPartition);
    if (a.max_parts > 1) {
      partials = at::empty({rows * Hkv * a.max_parts * (Hq / Hkv) * (D + 2)}, at::kFloat);
      a.partials = partials.data_ptr<float>();
    }
    return a;
  }

  // One parallel region of the team: fn(thread index, team size, the region's barrier).
  template <typename Fn>
  void in_team(Fn&& fn) {
    const int T = pool_.threads();
    ss::Barrier barrier(T);
    pool_.run([&](int i) { fn(i, T, barrier); });
  }

  // The VNNI build takes int8 activations for packed int8 weights: room for x quantized (a.x and
  // a.M set). Returns whether this linear does.
  bool int8_activations(ss::LinearArgs& a, at::Tensor& xq, at::Tensor& xd) const {
    if (ops_->quantize == nullptr || a.wfmt != ss::W_I8_PACKED) return false;
    const int64_t blocks = (a.K + ss::kActBlock - 1) / ss::kActBlock;
    xq = at::empty({a.M * a.K}, at::kByte);
    xd = at::empty({a.M * blocks}, at::kFloat);
    a.xq = xq.data_ptr<uint8_t>();
    a.xd = xd.data_ptr<float>();
    return true;
  }

  // Inside a parallel region: thread i's rows of x quantized, then a barrier (int8 activations only).
  void quantize_phase(const ss::LinearArgs& a, bool q8, int i, int T, ss::Barrier& barrier) const {
    if (!q8) return;
    auto rows = share(a.M, i, T);
    ops_->quantize(a, rows.first, rows.second);
    barrier.wait();
  }

  // Attention inside a parallel region: every partition, then the merge of rows of several.
  void attention_phase(const ss::AttentionArgs& a, ss::WorkQueue& parts, ss::WorkQueue& merges,
                       ss::Barrier& barrier) const {
    parts.drain([&](int64_t i0, int64_t i1) { ops_->attention(a, i0, i1); });
    if (a.max_parts == 1) return;
    barrier.wait();
    merges.drain([&](int64_t i0, int64_t i1) { ops_->attention_merge(a, i0, i1); });
  }

  static void check_slots(const at::Tensor& slots, int64_t S) {
    const int64_t* sl = slots.data_ptr<int64_t>();
    for (int64_t t = 0; t < slots.size(0); ++t)
      TORCH_CHECK(sl[t] >= -1 && sl[t] < S, "KV slot ", sl[t], " outside the cache of ", S);
  }

  ss::ThreadPool pool_;
  const ss::IsaOps* ops_ = nullptr;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "shardserve's CPU kernels: fixed reduction order per output, AVX2 and AVX-512 builds";
  m.def("cpu_isas", [] {
    const CpuFeatures f = cpu_features();
    std::vector<std::string> isas;
    if (f.avx512vnni) isas.push_back("avx512vnni");
    if (f.avx512) isas.push_back("avx512");
    if (f.avx2) isas.push_back("avx2");
    return isas;
  }, "ISA builds this CPU can run, best first");
  py::class_<SharedAllReduce>(m, "SharedAllReduce")
      .def(py::init<uint64_t, int64_t, int, int, double, py::object>(), py::arg("address"), py::arg("size"),
           py::arg("rank"), py::arg("world_size"), py::arg("timeout_s"), py::arg("timeout_error"))
      .def("all_reduce", &SharedAllReduce::all_reduce, py::arg("t"))
      .def("close", [](SharedAllReduce& c) { c.shm.detach(); })
      .def_property_readonly("capacity", [](const SharedAllReduce& c) { return c.shm.capacity(); });
  py::class_<Kernels>(m, "Kernels")
      .def(py::init<const std::string&, int, int>(), py::arg("isa"), py::arg("threads"), py::arg("spin_us") = 200)
      .def_property_readonly("isa", &Kernels::isa)
      .def_property_readonly("threads", &Kernels::threads)
      .def("linear", &Kernels::linear, py::arg("x"), py::arg("weight"), py::arg("scale"), py::arg("out"))
      .def("attention", &Kernels::attention)
      .def("norm", &Kernels::norm, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("out"))
      .def("kv_write", &Kernels::kv_write)
      .def("attn_block", &Kernels::attn_block)
      .def("mlp_block", &Kernels::mlp_block)
      .def("layer_block", &Kernels::layer_block)
      .def("add_norm", &Kernels::add_norm);
}
