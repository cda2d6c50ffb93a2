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
    const int T = pool_.threads();
    ss::Barrier barrier(T);
    ss::WorkQueue outputs = linear_queue(a);
    pool_.run([&](int i) {
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
    ss::Barrier barrier(pool_.threads());
    ss::WorkQueue parts(T * Hkv * a.max_parts, 1), merges(T * Hkv, 1);
    pool_.run([&](int) { attention_phase(a, parts, merges, barrier); });
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
    check(x, at::kFloat, 2, "x");
    const int64_t M = x.size(0), H = x.size(1), W = (Hq + 2 * Hkv) * D;
    ss::NormArgs norm = norm_args(x, residual, residual_bias, norm_w, eps);
    ss::LinearArgs qkv = linear_args(qkv_w, qkv_scale, qkv_bias, H, "qkv");
    TORCH_CHECK(qkv.N == W, "qkv weight has ", qkv.N, " outputs, heads need ", W);
    ss::LinearArgs o = linear_args(o_w, o_scale, c10::nullopt, Hq * D, "o_proj");
    check(positions, at::kLong, 1, "positions");
    check(slots, at::kLong, 1, "slots");
    check(cos, at::kFloat, 2, "cos");
    check(sin, at::kFloat, 2, "sin");
    TORCH_CHECK(positions.size(0) == M && slots.size(0) == M && cos.size(1) == D && sin.sizes() == cos.sizes(),
                "rotary shapes disagree");
    at::Tensor att = at::empty({M, Hq, D}, x.options()), partials;
    ss::AttentionArgs attn = attention_args(nullptr, M, Hq, Hkv, D, k_cache, v_cache, tables, row_seq, row_len,
                                            block_size, scale, att.data_ptr<float>(), partials);
    check_slots(slots, k_cache.size(0) * block_size);
    const int64_t* pos = positions.data_ptr<int64_t>();
    for (int64_t t = 0; t < M; ++t) TORCH_CHECK(pos[t] >= 0 && pos[t] < cos.size(0), "position ", pos[t], " past the rotary table");

    auto f32 = x.options();
    at::Tensor h = at::empty({M, H}, f32), qkv_out = at::empty({M, W}, f32), q = at::empty({M, Hq, D}, f32);
    at::Tensor y = at::empty({M, o.N}, f32);
    norm.y = h.data_ptr<float>();
    qkv.x = norm.y, qkv.M = M, qkv.y = qkv_out.data_ptr<float>();
    ss::RopeKvArgs rope{qkv.y, M, Hq, Hkv, D, pos, cos.data_ptr<float>(), sin.data_ptr<float>(), q.data_ptr<float>(),
                        slots.data_ptr<int64_t>(), block_size, k_cache.data_ptr(), v_cache.data_ptr(), attn.kv_f16};
    attn.q = rope.q_out;
    o.x = attn.out, o.M = M, o.y = y.data_ptr<float>();
    if (M == 0) return y;
    at::Tensor qkv_xq, qkv_xd, o_xq, o_xd;
    const bool qkv_q8 = int8_activations(qkv, qkv_xq, qkv_xd), o_q8 = int8_activations(o, o_xq, o_xd);
    py::gil_scoped_release nogil;
    const int T = pool_.threads();
    ss::Barrier barrier(T);
    ss::WorkQueue qkv_q = linear_queue(qkv), parts_q(M * Hkv * attn.max_parts, 1), merge_q(M * Hkv, 1);
    ss::WorkQueue o_q = linear_queue(o);
    pool_.run([&](int i) {
      auto rows = share(M, i, T);
      ops_->norm(norm, rows.first, rows.second);
      if (qkv_q8) ops_->quantize(qkv, rows.first, rows.second);  // the rows this thread normalised
      barrier.wait();
      qkv_q.drain([&](int64_t n0, int64_t n1) { ops_->linear(qkv, n0, n1); });
      barrier.wait();
      ops_->rope_kv(rope, rows.first, rows.second);
      barrier.wait();
      attention_phase(attn, parts_q, merge_q, barrier);
      barrier.wait();
      quantize_phase(o, o_q8, i, T, barrier);
      o_q.drain([&](int64_t n0, int64_t n1) { ops_->linear(o, n0, n1); });
    });
    return y;
  }

  // The MLP half: [x += residual (+ bias)], h = RMSNorm(x), gu = h W^T (+ b), a = silu(gate) * up,
  // y = a W_down^T. Returns y before any all-reduce.
  at::Tensor mlp_block(at::Tensor& x, const c10::optional<at::Tensor>& residual,
                       const c10::optional<at::Tensor>& residual_bias, const at::Tensor& norm_w, double eps,
                       const at::Tensor& gu_w, const c10::optional<at::Tensor>& gu_scale,
                       const c10::optional<at::Tensor>& gu_bias, const at::Tensor& down_w,
                       const c10::optional<at::Tensor>& down_scale) {
    check(x, at::kFloat, 2, "x");
    const int64_t M = x.size(0), H = x.size(1);
    ss::NormArgs norm = norm_args(x, residual, residual_bias, norm_w, eps);
    ss::LinearArgs gu = linear_args(gu_w, gu_scale, gu_bias, H, "gate_up");
    TORCH_CHECK(gu.N % 2 == 0, "gate_up must have an even number of outputs");
    const int64_t I = gu.N / 2;
    ss::LinearArgs down = linear_args(down_w, down_scale, c10::nullopt, I, "down");
    auto f32 = x.options();
    at::Tensor h = at::empty({M, H}, f32), gu_out = at::empty({M, 2 * I}, f32), act = at::empty({M, I}, f32);
    at::Tensor y = at::empty({M, down.N}, f32);
    norm.y = h.data_ptr<float>();
    gu.x = norm.y, gu.M = M, gu.y = gu_out.data_ptr<float>();
    ss::SiluMulArgs silu{gu.y, M, I, act.data_ptr<float>()};
    down.x = silu.out, down.M = M, down.y = y.data_ptr<float>();
    if (M == 0) return y;
    at::Tensor gu_xq, gu_xd, down_xq, down_xd;
    const bool gu_q8 = int8_activations(gu, gu_xq, gu_xd), down_q8 = int8_activations(down, down_xq, down_xd);
    py::gil_scoped_release nogil;
    const int T = pool_.threads();
    ss::Barrier barrier(T);
    ss::WorkQueue gu_q = linear_queue(gu), down_q = linear_queue(down);
    pool_.run([&](int i) {
      auto rows = share(M, i, T);
      ops_->norm(norm, rows.first, rows.second);
      if (gu_q8) ops_->quantize(gu, rows.first, rows.second);
      barrier.wait();
      gu_q.drain([&](int64_t n0, int64_t n1) { ops_->linear(gu, n0, n1); });
      barrier.wait();
      auto elems = share(M * I, i, T, 16);
      ops_->silu_mul(silu, elems.first, elems.second);
      barrier.wait();
      quantize_phase(down, down_q8, i, T, barrier);
      down_q.drain([&](int64_t n0, int64_t n1) { ops_->linear(down, n0, n1); });
    });
    return y;
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
  // A linear layer's outputs in whole tiles, about eight chunks per thread.
  ss::WorkQueue linear_queue(const ss::LinearArgs& a) const {
    const int64_t nr = ops_->linear_nr;
    return ss::WorkQueue(a.N, std::max<int64_t>(nr, a.N / (8 * pool_.threads()) / nr * nr));
  }

  ss::NormArgs norm_args(at::Tensor& x, const c10::optional<at::Tensor>& residual,
                         const c10::optional<at::Tensor>& residual_bias, const at::Tensor& w, double eps) {
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
      .def("add_norm", &Kernels::add_norm);
}
