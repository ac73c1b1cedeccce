// Fast math shared by the attention kernels.
#pragma once

namespace sparsek_math {

// 2^x as one MUFU.EX2 (flush-to-zero). `exp2f` without --use_fast_math adds a compare and two predicated multiplies
// around every MUFU to handle denormal results; softmax weights below 2^-126 of the row maximum are zero here anyway.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace sparsek_math
