// kv_block.cu — paged KV-cache block copy, gather and scatter (seed 001 §3.7–3.8).
//
// Layout of a KV pool (the decode worker's paged cache; documented in docs/gpu.md), block-major:
//   pool[num_blocks][num_layers][2][block_size][num_heads][head_dim]      (index 2: 0 = K, 1 = V)
// C-contiguous, any element type. A "block" is one page of block_size token slots; its data is
// one contiguous run of 2 * num_layers *segments* of block_words = block_size * num_heads *
// head_dim * itemsize / sizeof(W) words, segment s of block j starting at word
// (j * 2 * num_layers + s) * block_words. A packed buffer of n blocks (the host side of a swap)
// has the same layout with num_blocks = n. (The layer-major layout this replaced put segment s of
// block j at (s * num_blocks + j) * block_words: 2 * num_layers scattered segments per block.)
//
// One kernel does every block move: for pair p and segment s (s < gridDim.y = 2 * num_layers),
//   dst[dst_ids[p]][s][:] = src[src_ids[p]][s][:]
// - copy within one pool:    src == dst (the wrapper rejects a block that is both a source and a
//                            destination, and duplicate destinations, so no two threads write one
//                            word and no thread reads a word another writes);
// - gather (device -> packed staging buffer for a swap-out): dst_ids = 0..n-1;
// - scatter (packed buffer -> device pool on a swap-in):    src_ids = 0..n-1.
// The word type W is the widest of 16/8/4/2/1 bytes that divides the segment size and both base
// addresses; the wrapper picks the entry point kv_copy_blocks_w{16,8,4,2,1}.
//
// Launch shape: grid = (num_pairs, 2 * num_layers, 1), block = (256, 1, 1); the threads of a block
// stride over the words of one segment (coalesced 16-byte loads and stores when W = uint4).
// No shared memory, no synchronisation, no atomics.
//
// Compile: nvcc -arch=sm_80 --ptx cuda/kv_block.cu   (or CuPy RawModule; or g++ through
// cuda/host_shim.h for host emulation — see accel/emulate.py).

template <class W>
__device__ __forceinline__ void copy_blocks_body(const W* __restrict__ src, W* __restrict__ dst,
                                                 const long long* __restrict__ src_ids,
                                                 const long long* __restrict__ dst_ids,
                                                 long long block_words) {
  const long long pair = blockIdx.x;
  const long long segment = blockIdx.y;
  const long long segments = gridDim.y;  // 2 * num_layers: the segments of one block
  const W* s = src + (src_ids[pair] * segments + segment) * block_words;
  W* d = dst + (dst_ids[pair] * segments + segment) * block_words;
  for (long long i = threadIdx.x; i < block_words; i += blockDim.x) d[i] = s[i];
}

#define KV_COPY_ENTRY(suffix, W)                                                              \
  extern "C" __global__ void kv_copy_blocks_##suffix(                                         \
      const W* src, W* dst, const long long* src_ids, const long long* dst_ids,               \
      long long block_words) {                                                                \
    copy_blocks_body<W>(src, dst, src_ids, dst_ids, block_words);                             \
  }

KV_COPY_ENTRY(w16, uint4)
KV_COPY_ENTRY(w8, uint2)
KV_COPY_ENTRY(w4, unsigned)
KV_COPY_ENTRY(w2, unsigned short)
KV_COPY_ENTRY(w1, unsigned char)
