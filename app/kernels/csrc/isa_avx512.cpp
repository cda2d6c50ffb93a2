// The kernels built for AVX-512F (with AVX2, FMA, F16C): chosen at run time where the CPU has it.
// Same arithmetic as isa_avx2.cpp lane for lane (see vec16.h), so both give bitwise equal results.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <vector>

#include "kernel_args.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
namespace ss_avx512 {
#define SS_AVX512 1
#define SS_ISA_NAME "avx512"
#define SS_MR 4
#define SS_NR 4
#include "vec16.h"
#include "kernels_impl.h"
}  // namespace ss_avx512
#pragma GCC pop_options

namespace ss {
const IsaOps* avx512_ops() { return &ss_avx512::kOps; }
}  // namespace ss
