// demopack.cu — codebook ("demopack") weights and a fused decode + matvec (seed 003, SPARK).
//
// A float32 weight matrix W (rows, cols), row-major, is cut into sub-vectors of `dim` consecutive
// columns of one row: sub-vector (r, b) = W[r, b*dim : (b+1)*dim], b < nsub = cols / dim (the
// wrapper refuses shapes where dim does not divide cols). Each sub-vector is replaced by the index
// of its nearest codeword: codes[r * nsub + b] (unsigned char, K <= 256) into `codebook` (K, dim)
// float32. The stored matrix is the codebook plus 1 byte per `dim` weights.
//
// Kernels (no shared memory, no synchronisation, no atomics; every output has one writer):
//   dp_decode   W[r, b*dim + j] = codebook[codes[r*nsub + b], j]
//               one thread per sub-vector: grid = (ceil(rows*nsub / 128)), block = 128
//   dp_matvec   y[v, r] = sum_b sum_j codebook[codes[r*nsub + b], j] * x[v, b*dim + j]
//               for x (nvec, cols), y (nvec, rows): the weight tile of row r is synthesised from the
//               codebook as it is consumed and never written out (fused decode + GEMM);
//               one thread per (v, r): grid = (ceil(nvec*rows / 128)), block = 128. The sum runs
//               in float32 in the order b, then j (the NumPy reference sums the same way).
//
// Compile: nvcc -arch=sm_80 --ptx cuda/demopack.cu (or CuPy RawModule; or g++ via host_shim.h).

extern "C" __global__ void dp_decode(const float* codebook, const unsigned char* codes, float* out,
                                     long long rows, long long nsub, long long dim) {
  const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= rows * nsub) return;
  const float* src = codebook + (long long)codes[t] * dim;
  float* dst = out + t * dim;  // (r, b) sub-vector starts at r*cols + b*dim = t*dim
  for (long long j = 0; j < dim; ++j) dst[j] = src[j];
}

extern "C" __global__ void dp_matvec(const float* codebook, const unsigned char* codes, const float* x,
                                     float* y, long long rows, long long nsub, long long dim,
                                     long long nvec) {
  const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= nvec * rows) return;
  const long long v = t / rows, r = t % rows;
  const float* xv = x + v * nsub * dim;
  const unsigned char* row_codes = codes + r * nsub;
  float acc = 0.0f;
  for (long long b = 0; b < nsub; ++b) {
    const float* w = codebook + (long long)row_codes[b] * dim;
    const float* xs = xv + b * dim;
    float part = 0.0f;
    for (long long j = 0; j < dim; ++j) part += w[j] * xs[j];
    acc += part;
  }
  y[v * rows + r] = acc;
}
