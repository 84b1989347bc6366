// bk_core.cu — O(N) scans for the BK-core resolvent diagonal (seed 002; ../shared/specs/bk_core.md).
//
// The BK-core needs four first-order recurrences along the sequence, each a Möbius map of the
// previous value (accel/bk_core.py builds their coefficient arrays and combines the results):
//   pivot  (affine = 0):  x_s = d_s - e_s / x_{s-1}      left / right LU pivots of T = H - zI
//   affine (affine = 1):  x_s = d_s + e_s * x_{s-1}      the two sweeps of the exact backward
// with x_{-1} = 1 and e_0 = 0. Step s reads position pos = s (reverse = 0) or N-1-s (reverse = 1)
// of the row-major (B, N) arrays d and e, and writes x_s to out at pos. Each step is the 2x2
// matrix M_s = [[d, -e], [1, 0]] (pivot) or [[e, d], [0, 1]] (affine) acting on (x, 1)
// projectively, so a chunk of steps composes into one matrix — the parallel scan over transfer
// matrices that ../shared/specs/bk_core.md asks for, in three launches:
//   1. bk_scan_maps_*:  one thread per (row b, chunk k) composes its chunk's matrix, renormalised
//                       every step (projective, so scaling never changes the answer and nothing
//                       overflows: this is what lets N = 1,000,000 run without clamping);
//   2. bk_scan_carry_*: one thread per row applies the K chunk maps in order, giving each chunk's
//                       incoming value x_{start-1};
//   3. bk_scan_fill_*:  one thread per (row, chunk) runs its chunk's steps from that value and
//                       writes every x_s.
// Launch shapes: kernels 1 and 3: grid = (ceil(B*K / 128), 1, 1), block = (128, 1, 1);
// kernel 2: grid = (ceil(B / 128), 1, 1), block = (128, 1, 1). Scratch: maps (B, K, 4) and
// carry (B, K) of the same complex type. K = ceil(N / chunk).
// Complex types: double2 (complex128, entry points *_c128) and float2 (complex64, *_c64), laid out
// as interleaved (re, im) like numpy / CuPy complex arrays. No shared memory, no synchronisation.
//
// Compile: nvcc -arch=sm_80 --ptx cuda/bk_core.cu (or CuPy RawModule; or g++ via host_shim.h).

template <class R>
struct cx {
  R re, im;
};

template <class R>
__device__ __forceinline__ cx<R> cmul(cx<R> a, cx<R> b) {
  return cx<R>{a.re * b.re - a.im * b.im, a.re * b.im + a.im * b.re};
}
template <class R>
__device__ __forceinline__ cx<R> cadd(cx<R> a, cx<R> b) {
  return cx<R>{a.re + b.re, a.im + b.im};
}
template <class R>
__device__ __forceinline__ cx<R> csub(cx<R> a, cx<R> b) {
  return cx<R>{a.re - b.re, a.im - b.im};
}
// a / b, scaled by |b.re| + |b.im| first so that neither |b|^2 overflows nor underflows.
template <class R>
__device__ __forceinline__ cx<R> cdiv(cx<R> a, cx<R> b) {
  const R s = fabs(b.re) + fabs(b.im);
  const cx<R> as{a.re / s, a.im / s}, bs{b.re / s, b.im / s};
  const R den = bs.re * bs.re + bs.im * bs.im;
  return cx<R>{(as.re * bs.re + as.im * bs.im) / den, (as.im * bs.re - as.re * bs.im) / den};
}

// One recurrence step of kind `affine` applied to the value x.
template <class R>
__device__ __forceinline__ cx<R> scan_step(cx<R> x, cx<R> d, cx<R> e, int affine) {
  return affine ? cadd(d, cmul(e, x)) : csub(d, cdiv(e, x));
}

template <class R>
__device__ __forceinline__ long long scan_pos(long long s, long long n, int reverse) {
  return reverse ? n - 1 - s : s;
}

// maps[b][k] = (q00, q01, q10, q11): the product M_end ... M_start of chunk k, divided by its
// largest |re| or |im| after every step.
template <class R>
__device__ void scan_maps_body(const cx<R>* d, const cx<R>* e, cx<R>* maps, long long rows,
                               long long n, long long chunk, long long chunks, int reverse,
                               int affine) {
  const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= rows * chunks) return;
  const long long b = t / chunks, k = t % chunks;
  const long long start = k * chunk, stop = start + chunk < n ? start + chunk : n;
  const cx<R> zero{0, 0}, one{1, 0};
  cx<R> q00 = one, q01 = zero, q10 = zero, q11 = one;
  for (long long s = start; s < stop; ++s) {
    const long long pos = b * n + scan_pos<R>(s, n, reverse);
    const cx<R> ds = d[pos], es = e[pos];
    cx<R> n00, n01, n10, n11;
    if (affine) {  // [[e, d], [0, 1]] @ Q
      n00 = cadd(cmul(es, q00), cmul(ds, q10));
      n01 = cadd(cmul(es, q01), cmul(ds, q11));
      n10 = q10;
      n11 = q11;
    } else {  // [[d, -e], [1, 0]] @ Q
      n00 = csub(cmul(ds, q00), cmul(es, q10));
      n01 = csub(cmul(ds, q01), cmul(es, q11));
      n10 = q00;
      n11 = q01;
    }
    R m = fabs(n00.re);
    m = fmax(m, fabs(n00.im));
    m = fmax(m, fabs(n01.re));
    m = fmax(m, fabs(n01.im));
    m = fmax(m, fabs(n10.re));
    m = fmax(m, fabs(n10.im));
    m = fmax(m, fabs(n11.re));
    m = fmax(m, fabs(n11.im));
    const R inv = m > R(0) ? R(1) / m : R(1);
    q00 = cx<R>{n00.re * inv, n00.im * inv};
    q01 = cx<R>{n01.re * inv, n01.im * inv};
    q10 = cx<R>{n10.re * inv, n10.im * inv};
    q11 = cx<R>{n11.re * inv, n11.im * inv};
  }
  cx<R>* out = maps + 4 * t;
  out[0] = q00;
  out[1] = q01;
  out[2] = q10;
  out[3] = q11;
}

// carry[b][k] = x_{start(k) - 1}: the value entering chunk k (x_{-1} = 1 for chunk 0).
template <class R>
__device__ void scan_carry_body(const cx<R>* maps, cx<R>* carry, long long rows, long long chunks) {
  const long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= rows) return;
  cx<R> x{1, 0};
  for (long long k = 0; k < chunks; ++k) {
    carry[b * chunks + k] = x;
    const cx<R>* q = maps + 4 * (b * chunks + k);
    x = cdiv(cadd(cmul(q[0], x), q[1]), cadd(cmul(q[2], x), q[3]));
  }
}

template <class R>
__device__ void scan_fill_body(const cx<R>* d, const cx<R>* e, const cx<R>* carry, cx<R>* out,
                               long long rows, long long n, long long chunk, long long chunks,
                               int reverse, int affine) {
  const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= rows * chunks) return;
  const long long b = t / chunks, k = t % chunks;
  const long long start = k * chunk, stop = start + chunk < n ? start + chunk : n;
  cx<R> x = carry[t];
  for (long long s = start; s < stop; ++s) {
    const long long pos = b * n + scan_pos<R>(s, n, reverse);
    x = scan_step(x, d[pos], e[pos], affine);
    out[pos] = x;
  }
}

#define BK_ENTRIES(suffix, V, R)                                                                \
  extern "C" __global__ void bk_scan_maps_##suffix(const V* d, const V* e, V* maps,             \
                                                   long long rows, long long n, long long chunk,\
                                                   long long chunks, int reverse, int affine) { \
    scan_maps_body<R>((const cx<R>*)d, (const cx<R>*)e, (cx<R>*)maps, rows, n, chunk, chunks,   \
                      reverse, affine);                                                         \
  }                                                                                             \
  extern "C" __global__ void bk_scan_carry_##suffix(const V* maps, V* carry, long long rows,    \
                                                    long long chunks) {                         \
    scan_carry_body<R>((const cx<R>*)maps, (cx<R>*)carry, rows, chunks);                        \
  }                                                                                             \
  extern "C" __global__ void bk_scan_fill_##suffix(const V* d, const V* e, const V* carry,      \
                                                   V* out, long long rows, long long n,         \
                                                   long long chunk, long long chunks,           \
                                                   int reverse, int affine) {                   \
    scan_fill_body<R>((const cx<R>*)d, (const cx<R>*)e, (const cx<R>*)carry, (cx<R>*)out, rows, \
                      n, chunk, chunks, reverse, affine);                                       \
  }

BK_ENTRIES(c128, double2, double)
BK_ENTRIES(c64, float2, float)
