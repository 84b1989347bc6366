// host_shim.h — compile reca's CUDA kernels as plain C++ for host emulation.
//
// What it does: defines the CUDA keywords, built-in index variables, vector types and intrinsics
// that reca's kernels use, so that the *same* .cu source compiles with g++; `emu::launch` runs a
// kernel by looping over the grid and the block, one thread at a time, in index order.
//
// Execution model and why it is exact for reca's kernels: every kernel in cuda/ is written so that
// the threads of one launch never communicate — no __shared__ memory, no __syncthreads, no warp
// intrinsics, no atomics, and each output element is written by exactly one thread (the Python
// wrappers reject mappings that would make two threads write one element). For such kernels any
// serial order of the threads gives the result of the parallel launch, so looping is exact.
// __syncthreads and __shared__ are defined to fail to compile, so a kernel that starts to need
// them cannot be emulated by accident with wrong semantics.
//
// Launch checks mirror CUDA's: a zero grid or block dimension, more than 1024 threads per block,
// block.z > 64, or grid.y / grid.z > 65535 is an invalid configuration (emu::launch returns 1).
//
// Exporting a kernel to ctypes: EMU_EXPORT(name) after the kernel's definition gives
//   extern "C" int emu_launch_<name>(const unsigned grid[3], const unsigned block[3], void** args)
//   extern "C" const char* emu_signature_<name>()
// where args points at each argument's value (the convention of cuLaunchKernel), and the signature
// is one type code per parameter: 'p' pointer, 'i' int, 'I' unsigned, 'q' long long,
// 'Q' unsigned long long, 'f' float, 'd' double. The Python loader checks arguments against it.
//
// Build: included by accel/emulate.py's driver, g++ -std=c++17 -O2 -shared -fPIC.
#pragma once

#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __align__(n) alignas(n)
#define __launch_bounds__(...)
#define __syncthreads() static_assert(false, "host emulation runs threads serially: __syncthreads is not supported")
#define __shared__ static_assert(false, "host emulation does not support __shared__ memory");

// Float overloads of the math functions CUDA provides in the global namespace.
using std::fabs;
using std::fmax;
using std::fmin;
using std::rint;

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) double2 {
  double x, y;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline double2 make_double2(double x, double y) { return double2{x, y}; }

inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

namespace emu {

inline thread_local dim3 thread_idx, block_idx, block_dim, grid_dim;

template <class T>
constexpr char type_code() {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_pointer_v<U>) return 'p';
  else if constexpr (std::is_same_v<U, int>) return 'i';
  else if constexpr (std::is_same_v<U, unsigned>) return 'I';
  else if constexpr (std::is_same_v<U, long long>) return 'q';
  else if constexpr (std::is_same_v<U, unsigned long long>) return 'Q';
  else if constexpr (std::is_same_v<U, float>) return 'f';
  else if constexpr (std::is_same_v<U, double>) return 'd';
  else static_assert(sizeof(T) == 0, "kernel parameter type has no emulation type code");
}

template <class... A>
const char* signature(void (*)(A...)) {
  static const char codes[] = {type_code<A>()..., '\0'};
  return codes;
}

template <class... A, std::size_t... I>
void call(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
  kernel(*static_cast<std::remove_cv_t<A>*>(args[I])...);
}

// Runs every thread of the launch in (block z, y, x; thread z, y, x) order. Returns 0, or 1 for a
// launch configuration CUDA would reject (nothing is run then).
template <class... A>
int launch(void (*kernel)(A...), const unsigned* grid, const unsigned* block, void** args) {
  const dim3 g{grid[0], grid[1], grid[2]}, b{block[0], block[1], block[2]};
  if (!g.x || !g.y || !g.z || !b.x || !b.y || !b.z) return 1;
  if ((unsigned long long)b.x * b.y * b.z > 1024 || b.z > 64) return 1;
  if (g.y > 65535 || g.z > 65535) return 1;
  grid_dim = g;
  block_dim = b;
  for (unsigned bz = 0; bz < g.z; ++bz)
    for (unsigned by = 0; by < g.y; ++by)
      for (unsigned bx = 0; bx < g.x; ++bx) {
        block_idx = dim3{bx, by, bz};
        for (unsigned tz = 0; tz < b.z; ++tz)
          for (unsigned ty = 0; ty < b.y; ++ty)
            for (unsigned tx = 0; tx < b.x; ++tx) {
              thread_idx = dim3{tx, ty, tz};
              call(kernel, args, std::index_sequence_for<A...>{});
            }
      }
  return 0;
}

}  // namespace emu

#define threadIdx (::emu::thread_idx)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)

#define EMU_EXPORT(name)                                                                      \
  extern "C" int emu_launch_##name(const unsigned* grid, const unsigned* block, void** args) { \
    return ::emu::launch(name, grid, block, args);                                            \
  }                                                                                           \
  extern "C" const char* emu_signature_##name() { return ::emu::signature(name); }
