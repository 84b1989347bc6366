// precision.cu — per-block precision masks (seed 001 §3.11, the Per-Operator Precision Budgeter).
//
// A float32 matrix x (rows, cols), row-major, is cut into blocks of `block` consecutive columns of
// one row (the last block of a row may be shorter): block (r, k) = x[r, k*block : (k+1)*block].
// codes[r * nblocks + k] picks the block's storage precision:
//   0 = fp32 (kept), 1 = fp16, 2 = bf16, 3 = int8 (symmetric, per-block scale).
// The quantised matrix is one byte buffer `payload`: block t's values start at byte offsets[t]
// (a multiple of 4, computed by the wrapper from the codes), stored as float / IEEE half /
// bfloat16 / signed char. scales[t] (float32) multiplies the stored value on the way back:
//   int8: amax / 127 (1 if the block is all zeros; rounded up to a multiple of 2^-149 when that is
//         below FLT_MIN, so it never underflows to 0), q = clamp(rint(x / scale), -127, 127)
//   fp16: amax / 65504 when amax > 65504 (so large blocks saturate nowhere), else 1
//   fp32, bf16: 1
// Conversions round to nearest even, written with bit operations so that the device build and
// the host-emulation build (host_shim.h) give identical bits; accel/precision.py's NumPy / torch
// reference reproduces them exactly.
//
// Kernels (no shared memory, no synchronisation, no atomics; every output has one writer):
//   prec_quantise    one thread per block:            grid = (ceil(rows*nblocks / 128)), block = 128
//   prec_dequantise  one thread per block, writes float32 (rows, cols)
//   prec_matvec      y[v, r] = sum_c deq(x)[r, c] * vec[v, c] for vec (nvec, cols), y (nvec, rows);
//                    one thread per (v, r): grid = (ceil(nvec*rows / 128)), block = 128; each
//                    block's partial sum is accumulated in float32 in the stored precision and
//                    multiplied by the block's scale once.
//
// Compile: nvcc -arch=sm_80 --ptx cuda/precision.cu (or CuPy RawModule; or g++ via host_shim.h).

#define PREC_FP32 0
#define PREC_FP16 1
#define PREC_BF16 2
#define PREC_INT8 3

__device__ __forceinline__ unsigned short f32_to_f16_rn(float f) {
  const unsigned x = __float_as_uint(f);
  const unsigned sign = (x >> 16) & 0x8000u;
  const unsigned ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return (unsigned short)(sign | 0x7e00u);  // NaN
  if (ax >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (ax < 0x38800000u) {                                           // below 2^-14: subnormal half
    if (ax < 0x33000000u) return (unsigned short)sign;               // below 2^-25: zero
    const unsigned e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u;
    const unsigned shift = 126u - e;  // 14 .. 24
    unsigned r = m >> shift;
    const unsigned rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return (unsigned short)(sign | r);
  }
  const unsigned rebased = ax - 0x38000000u;  // exponent bias 127 -> 15
  unsigned r = rebased >> 13;
  const unsigned rem = rebased & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return (unsigned short)(sign | r);
}

__device__ __forceinline__ float f16_to_f32(unsigned short h) {
  const unsigned sign = ((unsigned)h & 0x8000u) << 16;
  const unsigned e = ((unsigned)h >> 10) & 0x1fu, m = (unsigned)h & 0x3ffu;
  if (e == 0) {
    const float v = (float)m * 5.9604644775390625e-08f;  // m * 2^-24
    return sign ? -v : v;
  }
  if (e == 31) return __uint_as_float(sign | 0x7f800000u | (m << 13));
  return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
}

__device__ __forceinline__ unsigned short f32_to_bf16_rn(float f) {
  const unsigned x = __float_as_uint(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((x >> 16) | 0x40u);  // quiet NaN
  return (unsigned short)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ float bf16_to_f32(unsigned short h) {
  return __uint_as_float((unsigned)h << 16);
}

__device__ __forceinline__ long long block_len(long long k, long long cols, long long block) {
  const long long start = k * block;
  return start + block < cols ? block : cols - start;
}

extern "C" __global__ void prec_quantise(const float* x, const unsigned char* codes,
                                         const long long* offsets, unsigned char* payload,
                                         float* scales, long long rows, long long cols,
                                         long long block, long long nblocks) {
  const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= rows * nblocks) return;
  const long long r = t / nblocks, k = t % nblocks, len = block_len(k, cols, block);
  const float* src = x + r * cols + k * block;
  const int code = codes[t];
  float amax = 0.0f;
  for (long long j = 0; j < len; ++j) amax = fmaxf(amax, fabsf(src[j]));
  float scale = 1.0f;
  if (code == PREC_INT8 && amax > 0.0f) {
    scale = amax / 127.0f;
    // A subnormal scale loses bits: below amax ~ 8.9e-44 it rounds to 0 (x / 0 gives NaN codes,
    // which device and host clamp differently), just above it to 2^-149 and codes clip.  Round it
    // *up* in units of 2^-149 instead, so every |x| / scale <= 127 and the scale is never 0.
    if (scale < 1.17549435e-38f) scale = (float)(ceil((double)amax * 0x1p149 / 127.0) * 0x1p-149);
  }
  if (code == PREC_FP16 && amax > 65504.0f) scale = amax / 65504.0f;
  scales[t] = scale;
  unsigned char* dst = payload + offsets[t];
  if (code == PREC_FP32) {
    float* out = (float*)dst;
    for (long long j = 0; j < len; ++j) out[j] = src[j];
  } else if (code == PREC_FP16) {
    unsigned short* out = (unsigned short*)dst;
    for (long long j = 0; j < len; ++j) out[j] = f32_to_f16_rn(src[j] / scale);
  } else if (code == PREC_BF16) {
    unsigned short* out = (unsigned short*)dst;
    for (long long j = 0; j < len; ++j) out[j] = f32_to_bf16_rn(src[j]);
  } else {
    signed char* out = (signed char*)dst;
    for (long long j = 0; j < len; ++j) {
      const float q = fminf(fmaxf(rintf(src[j] / scale), -127.0f), 127.0f);
      out[j] = (signed char)q;
    }
  }
}

// The stored value of element j of a block, before its scale.
__device__ __forceinline__ float stored_value(const unsigned char* base, int code, long long j) {
  if (code == PREC_FP32) return ((const float*)base)[j];
  if (code == PREC_FP16) return f16_to_f32(((const unsigned short*)base)[j]);
  if (code == PREC_BF16) return bf16_to_f32(((const unsigned short*)base)[j]);
  return (float)((const signed char*)base)[j];
}

extern "C" __global__ void prec_dequantise(const unsigned char* payload, const unsigned char* codes,
                                           const long long* offsets, const float* scales,
                                           float* out, long long rows, long long cols,
                                           long long block, long long nblocks) {
  const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= rows * nblocks) return;
  const long long r = t / nblocks, k = t % nblocks, len = block_len(k, cols, block);
  const unsigned char* base = payload + offsets[t];
  const int code = codes[t];
  const float scale = scales[t];
  float* dst = out + r * cols + k * block;
  for (long long j = 0; j < len; ++j) dst[j] = stored_value(base, code, j) * scale;
}

extern "C" __global__ void prec_matvec(const unsigned char* payload, const unsigned char* codes,
                                       const long long* offsets, const float* scales,
                                       const float* vec, float* y, long long rows, long long cols,
                                       long long block, long long nblocks, long long nvec) {
  const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= nvec * rows) return;
  const long long v = t / rows, r = t % rows;
  const float* xv = vec + v * cols;
  float acc = 0.0f;
  for (long long k = 0; k < nblocks; ++k) {
    const long long b = r * nblocks + k, len = block_len(k, cols, block);
    const unsigned char* base = payload + offsets[b];
    const int code = codes[b];
    const float* xs = xv + k * block;
    float part = 0.0f;
    for (long long j = 0; j < len; ++j) part += stored_value(base, code, j) * xs[j];
    acc += part * scales[b];
  }
  y[v * rows + r] = acc;
}
