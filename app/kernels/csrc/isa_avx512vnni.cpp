// The AVX-512 build with VNNI: the same kernels as isa_avx512.cpp, except that a linear layer with
// packed int8 weights quantizes its activations to int8 (blocks of 16) and sums exactly in int32
// (vpdpbusd). A different arithmetic from the other builds (chosen from the CPU flags, never by a
// timing); batch-invariant the same way.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <vector>

#include "kernel_args.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vnni,avx2,fma,f16c")
namespace ss_avx512vnni {
#define SS_AVX512 1
#define SS_ISA_NAME "avx512vnni"
#define SS_INT8_ACT 1
#define SS_MR 4
#define SS_NR 4
#include "vec16.h"
#include "kernels_impl.h"
}  // namespace ss_avx512vnni
#pragma GCC pop_options

namespace ss {
const IsaOps* avx512vnni_ops() { return &ss_avx512vnni::kOps; }
}  // namespace ss
