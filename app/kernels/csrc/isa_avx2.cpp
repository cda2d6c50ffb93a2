// The kernels built for AVX2 + FMA + F16C (the baseline x86-64 server CPU of the last decade).
// Target attributes per file, never -march=native: the build machine's CPU must not leak in.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <vector>

#include "kernel_args.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace ss_avx2 {
#define SS_ISA_NAME "avx2"
#define SS_MR 2
#define SS_NR 4
#include "vec16.h"
#include "kernels_impl.h"
}  // namespace ss_avx2
#pragma GCC pop_options

namespace ss {
const IsaOps* avx2_ops() { return &ss_avx2::kOps; }
}  // namespace ss
