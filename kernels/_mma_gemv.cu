// Packed low-bit weights times 1-16 float16 activation rows on tensor cores (see _mma_gemv.py).
//
// Why CUDA and not Triton: at one row the Triton GEMVs spend 4.4-4.7 warp instructions a code
// (ncu, kernels/NOTES.md run 39) and are bound by their own execution. Here every instruction is
// chosen: one lop3 and one fma.f16x2 turn two codes into the exact float16 pair (q - z), and
// mma.sync.m16n8k16 multiplies 16 weight rows by up to 8 tokens with float32 accumulation, so the
// activations cost nothing per code.
//
// Layout of a warp's work: a block takes 16 weight rows; its warps split K into steps of four
// chunks (32 codes a chunk, 16 at 8 bits). Thread (g, t) = (lane / 4, lane % 4) loads chunk t of
// rows g and g + 8 (MMA rows g, g + 8); the chunk's code pair j (codes 2j, 2j + 1, as
// hpsearch/kernels/_format.py stores them: 16 bits apart in one word) is the A operand's k pair of
// MMA j / 2 (a0a1 / a2a3 for even j, a4a5 / a6a7 for odd j), and the B operand of the same thread
// holds the activations of the same two codes for token g (g + 8 in the second token tile). Any
// bijection between a thread's codes and its k slots is a valid dot product; this one makes each
// thread's activations one contiguous 64-byte load.
//
// Dequantization (the magic-number trick): (w & mask) | 0x64006400 puts a field at bit o of each
// half-word under the float16 exponent of 1024, reading 1024 + q * 2^o exactly (o + bits <= 10);
// one fma.f16x2 by 2^-o plus -(1024 * 2^-o + z) gives q - z exactly. With groups that hold whole
// steps (SCALE_AFTER) the MMA sums (q - z) x over a step and the float32 result is scaled once a
// step; otherwise each pair is scaled in float16 (mul.f16x2), which is exactly the reference's
// float16 W_hat.
//
// Built at first use by hpsearch/kernels/_mma_gemv.py with nvcc into a shared library (no torch
// headers: about 12 seconds) and launched through ctypes on the caller's stream, so CUDA graphs
// capture it.

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr uint32_t MAGIC = 0x64006400u;  // float16 1024.0 in both halves
constexpr int MAX_WARPS = 16;

template <uint32_t MASK>
__device__ __forceinline__ uint32_t field(uint32_t w) {  // (w & MASK) | MAGIC
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(w), "n"(MASK), "n"(MAGIC));
  return d;
}

__device__ __forceinline__ uint32_t hfma2(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

__device__ __forceinline__ uint32_t hadd2(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("add.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

__device__ __forceinline__ uint32_t hmul2(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

// 2^-o in both halves (float16 exponent 15 - o)
template <int O>
__device__ __forceinline__ constexpr uint32_t pow2neg() {
  return ((15u - O) << 10) * 0x10001u;
}

// 1024 - 2^(10 - o) in both halves: added to -(1024 + z) it gives -(2^(10 - o) + z)
template <int O>
__device__ __forceinline__ constexpr uint32_t offset_bits() {
  return (O == 2 ? 0x6200u : O == 3 ? 0x6300u : O == 4 ? 0x6380u : O == 6 ? 0x63E0u : O == 8 ? 0x63F8u : 0u) *
         0x10001u;
}

// -(2^(10 - o) + z) in both halves, from base = -(1024 + z)
template <int O>
__device__ __forceinline__ uint32_t zero_const(uint32_t base) {
  if constexpr (O == 0) {
    return base;
  } else {
    return hadd2(base, offset_bits<O>());
  }
}

// q - z of the field at bit O of both halves of w
template <uint32_t MASK, int O>
__device__ __forceinline__ uint32_t pair(uint32_t w, uint32_t zc) {
  if constexpr (O == 0) {
    return hadd2(field<MASK>(w), zc);
  } else {
    return hfma2(field<MASK>(w), pow2neg<O>(), zc);
  }
}

// One format's chunk: WORDS words of each of PLANES planes (one load each), CODES codes, CODES / 2
// pairs; Z holds the per-offset zero constants of one row and group.
template <int BITS>
struct Codec;

template <>
struct Codec<4> {
  static constexpr int WORDS = 4, PLANES = 1, CODES = 32;
  struct Z { uint32_t o0, o4; };
  static __device__ __forceinline__ Z zeros(uint32_t base) { return {base, zero_const<4>(base)}; }
  static __device__ __forceinline__ void pairs(const uint32_t* w, Z z, uint32_t* p) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // word i: pairs 4i .. 4i + 3 at bits 0, 4, 8, 12 of each half
      const uint32_t hi = w[i] >> 8;
      p[4 * i + 0] = pair<0x000F000Fu, 0>(w[i], z.o0);
      p[4 * i + 1] = pair<0x00F000F0u, 4>(w[i], z.o4);
      p[4 * i + 2] = pair<0x000F000Fu, 0>(hi, z.o0);
      p[4 * i + 3] = pair<0x00F000F0u, 4>(hi, z.o4);
    }
  }
};

template <>
struct Codec<2> {
  static constexpr int WORDS = 2, PLANES = 1, CODES = 32;
  struct Z { uint32_t o0, o2, o4, o6, o8; };
  static __device__ __forceinline__ Z zeros(uint32_t base) {
    return {base, zero_const<2>(base), zero_const<4>(base), zero_const<6>(base), zero_const<8>(base)};
  }
  static __device__ __forceinline__ void pairs(const uint32_t* w, Z z, uint32_t* p) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {  // word i: pairs 8i .. 8i + 7 at bits 0, 2, .., 14 of each half
      const uint32_t hi = w[i] >> 10;
      p[8 * i + 0] = pair<0x00030003u, 0>(w[i], z.o0);
      p[8 * i + 1] = pair<0x000C000Cu, 2>(w[i], z.o2);
      p[8 * i + 2] = pair<0x00300030u, 4>(w[i], z.o4);
      p[8 * i + 3] = pair<0x00C000C0u, 6>(w[i], z.o6);
      p[8 * i + 4] = pair<0x03000300u, 8>(w[i], z.o8);
      p[8 * i + 5] = pair<0x00030003u, 0>(hi, z.o0);
      p[8 * i + 6] = pair<0x000C000Cu, 2>(hi, z.o2);
      p[8 * i + 7] = pair<0x00300030u, 4>(hi, z.o4);
    }
  }
};

template <>
struct Codec<8> {
  static constexpr int WORDS = 4, PLANES = 1, CODES = 16;
  struct Z { uint32_t o0; };
  static __device__ __forceinline__ Z zeros(uint32_t base) { return {base}; }
  static __device__ __forceinline__ void pairs(const uint32_t* w, Z z, uint32_t* p) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // word i: pairs 2i, 2i + 1 at bits 0, 8 of each half
      p[2 * i + 0] = pair<0x00FF00FFu, 0>(w[i], z.o0);
      p[2 * i + 1] = pair<0x00FF00FFu, 0>(w[i] >> 8, z.o0);
    }
  }
};

template <>
struct Codec<3> {  // one unit: word p of each plane holds pairs 5p .. 5p + 4; pair 15 in the spare bits
  static constexpr int WORDS = 1, PLANES = 3, CODES = 32;
  struct Z { uint32_t o0, o3, o6; };
  static __device__ __forceinline__ Z zeros(uint32_t base) {
    return {base, zero_const<3>(base), zero_const<6>(base)};
  }
  static __device__ __forceinline__ void pairs(const uint32_t* w, Z z, uint32_t* p) {
#pragma unroll
    for (int q = 0; q < 3; ++q) {
      const uint32_t hi = w[q] >> 9;
      p[5 * q + 0] = pair<0x00070007u, 0>(w[q], z.o0);
      p[5 * q + 1] = pair<0x00380038u, 3>(w[q], z.o3);
      p[5 * q + 2] = pair<0x01C001C0u, 6>(w[q], z.o6);
      p[5 * q + 3] = pair<0x00070007u, 0>(hi, z.o0);
      p[5 * q + 4] = pair<0x00380038u, 3>(hi, z.o3);
    }
    // codes 30 and 31: bit q of each is bit 15 / 31 of word q
    uint32_t s = field<0x00010001u>(w[0] >> 15);
    s |= (w[1] >> 14) & 0x00020002u;
    s |= (w[2] >> 13) & 0x00040004u;
    p[15] = hadd2(s, z.o0);
  }
};

// The zero of (row, group) from qzeros, packed like the codes (_format.py): the words that hold it
// (loaded a step ahead with the weights), then the field.
template <int BITS>
struct ZeroWords {
  static constexpr int N = BITS == 3 ? 3 : 1;
  uint32_t w[N];
};

template <int BITS>
__device__ __forceinline__ void load_zero_words(const uint32_t* __restrict__ qz, int row, int grp, int zrow_words,
                                                int zplane, ZeroWords<BITS>& z) {
  const uint32_t* zr = qz + (size_t)row * zrow_words;
  if constexpr (BITS == 3) {
    const uint32_t* u = zr + (grp >> 5);
#pragma unroll
    for (int q = 0; q < 3; ++q) z.w[q] = __ldg(u + q * zplane);
  } else {
    z.w[0] = __ldg(zr + grp / (32 / BITS));
  }
}

template <int BITS>
__device__ __forceinline__ uint32_t zero_field(const ZeroWords<BITS>& z, int grp) {
  if constexpr (BITS == 3) {
    const int c = grp & 31, j = c >> 1, h = c & 1;
    if (j < 15) {
      const int p = j / 5;
      const uint32_t w = p == 0 ? z.w[0] : p == 1 ? z.w[1] : z.w[2];
      return (w >> (16 * h + 3 * (j % 5))) & 7u;
    }
    const int sh = 15 + 16 * h;
    return ((z.w[0] >> sh) & 1u) | (((z.w[1] >> sh) & 1u) << 1) | (((z.w[2] >> sh) & 1u) << 2);
  } else {
    constexpr int P = 32 / BITS;
    const int c = grp % P, slot = c / 2 + (c % 2) * (P / 2);
    return (z.w[0] >> (slot * BITS)) & ((1u << BITS) - 1u);
  }
}

__device__ __forceinline__ void mma(float* d, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                    uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

struct Args {
  const half* x;
  const uint32_t* qw;
  const half* scales;
  const uint32_t* qz;
  const half* bias;
  half* y;
  int m, n, k, groups, gshift, x_stride, y_stride, row_words, plane_words, zrow_words, zplane;
};

// Activation pairs of one token for codes k0 .. k0 + CODES - 1 (zero past K).
template <int CODES>
__device__ __forceinline__ void load_x(const Args& a, int tok, int k0, uint32_t* xp) {
  const half* row = a.x + (size_t)tok * a.x_stride;
  if (k0 + CODES <= a.k) {
    const uint4* v = reinterpret_cast<const uint4*>(row + k0);
#pragma unroll
    for (int i = 0; i < CODES / 8; ++i) {
      const uint4 u = __ldg(v + i);
      xp[4 * i] = u.x; xp[4 * i + 1] = u.y; xp[4 * i + 2] = u.z; xp[4 * i + 3] = u.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < CODES / 2; ++j) {
      const int kk = k0 + 2 * j;
      const uint32_t lo = kk < a.k ? __half_as_ushort(row[kk]) : 0u;
      const uint32_t hi = kk + 1 < a.k ? __half_as_ushort(row[kk + 1]) : 0u;
      xp[j] = lo | (hi << 16);
    }
  }
}

// What a thread needs for one step, requested D steps ahead of its use: chunk t of rows g and g + 8,
// their scales and zero words, and (one token tile) the chunk's activation pairs. Every load of a
// step is in flight together; only their use waits (kernels/NOTES.md run 40: loaded at their use,
// the scales, zeros and activations put an L2 round trip into every step).
template <int BITS, int MT>
struct Chunk {
  static constexpr int XP = MT == 1 ? Codec<BITS>::CODES / 2 : 1;  // 9-16 rows: loaded at use (registers)
  uint32_t w[2][Codec<BITS>::WORDS * Codec<BITS>::PLANES];
  ZeroWords<BITS> z[2];
  unsigned short s[2];
  int grp;
  uint32_t x[XP];
};

template <int BITS, int MT, bool SCALE_AFTER>
__device__ __forceinline__ void load_chunk(const Args& a, int r0, int r1, int step, int t, int tok0,
                                           Chunk<BITS, MT>& c) {
  using C = Codec<BITS>;
  const int k0 = step * 4 * C::CODES + t * C::CODES;
  c.grp = min((SCALE_AFTER ? step * 4 * C::CODES : k0) >> a.gshift, a.groups - 1);
  c.s[0] = __ldg(reinterpret_cast<const unsigned short*>(a.scales) + (size_t)r0 * a.groups + c.grp);
  c.s[1] = __ldg(reinterpret_cast<const unsigned short*>(a.scales) + (size_t)r1 * a.groups + c.grp);
  load_zero_words<BITS>(a.qz, r0, c.grp, a.zrow_words, a.zplane, c.z[0]);
  load_zero_words<BITS>(a.qz, r1, c.grp, a.zrow_words, a.zplane, c.z[1]);
  if constexpr (MT == 1) load_x<C::CODES>(a, tok0, k0, c.x);
  const int rows[2] = {r0, r1};
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint32_t* base = a.qw + (size_t)rows[h] * a.row_words;
    if constexpr (BITS == 3) {
      const uint32_t* u = base + (k0 >> 5);
#pragma unroll
      for (int q = 0; q < 3; ++q) c.w[h][q] = __ldcs(reinterpret_cast<const unsigned int*>(u + q * a.plane_words));
    } else if constexpr (C::WORDS == 4) {
      const uint4 v = __ldcs(reinterpret_cast<const uint4*>(base + (k0 * BITS >> 5)));
      c.w[h][0] = v.x; c.w[h][1] = v.y; c.w[h][2] = v.z; c.w[h][3] = v.w;
    } else {
      const uint2 v = __ldcs(reinterpret_cast<const uint2*>(base + (k0 * BITS >> 5)));
      c.w[h][0] = v.x; c.w[h][1] = v.y;
    }
  }
}

template <int BITS, int MT, bool SCALE_AFTER, int D>
__global__ void __launch_bounds__(32 * MAX_WARPS) mma_gemv_kernel(Args a) {
  using C = Codec<BITS>;
  constexpr int STEP = 4 * C::CODES, PAIRS = C::CODES / 2;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * 16;
  const int r0 = min(n0 + g, a.n - 1), r1 = min(n0 + g + 8, a.n - 1);
  int toks[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) toks[mt] = min(g + 8 * mt, a.m - 1);
  const int steps = (a.k + STEP - 1) / STEP;

  float acc[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[mt][i] = 0.f;

  // a ring of D steps in registers: step s + D * nwarps is requested before step s is used
  Chunk<BITS, MT> ring[D];
#pragma unroll
  for (int d = 0; d < D; ++d)
    if (warp + d * nwarps < steps) load_chunk<BITS, MT, SCALE_AFTER>(a, r0, r1, warp + d * nwarps, t, toks[0], ring[d]);
  for (int s = warp; s < steps; s += nwarps) {
    Chunk<BITS, MT> next;
    if (s + D * nwarps < steps) load_chunk<BITS, MT, SCALE_AFTER>(a, r0, r1, s + D * nwarps, t, toks[0], next);
    const Chunk<BITS, MT>& cur = ring[0];

    uint32_t xp[MT][PAIRS];
    if constexpr (MT == 1) {
#pragma unroll
      for (int j = 0; j < PAIRS; ++j) xp[0][j] = cur.x[j];
    } else {
      const int k0 = s * STEP + t * C::CODES;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) load_x<C::CODES>(a, toks[mt], k0, xp[mt]);
    }
    const half s0 = __ushort_as_half(cur.s[0]), s1 = __ushort_as_half(cur.s[1]);
    const uint32_t z0 = zero_field<BITS>(cur.z[0], cur.grp);
    const uint32_t z1 = zero_field<BITS>(cur.z[1], cur.grp);
    // -(1024 + z) in both halves
    const typename C::Z zc0 = C::zeros(((z0 | 0x6400u) * 0x10001u) ^ 0x80008000u);
    const typename C::Z zc1 = C::zeros(((z1 | 0x6400u) * 0x10001u) ^ 0x80008000u);
    uint32_t p0[PAIRS], p1[PAIRS];
    C::pairs(cur.w[0], zc0, p0);
    C::pairs(cur.w[1], zc1, p1);
    if constexpr (!SCALE_AFTER) {
      const uint32_t s0x2 = __half_as_ushort(s0) * 0x10001u, s1x2 = __half_as_ushort(s1) * 0x10001u;
#pragma unroll
      for (int j = 0; j < PAIRS; ++j) {
        p0[j] = hmul2(p0[j], s0x2);
        p1[j] = hmul2(p1[j], s1x2);
      }
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      if constexpr (SCALE_AFTER) {  // the step's sum of (q - z) x, scaled once; two MMA chains
        float d[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int j = 0; j < PAIRS; j += 2) {
          mma(d[(j >> 1) & 1], p0[j], p1[j], p0[j + 1], p1[j + 1], xp[mt][j], xp[mt][j + 1]);
        }
        const float f0 = __half2float(s0), f1 = __half2float(s1);
        acc[mt][0] = fmaf(f0, d[0][0] + d[1][0], acc[mt][0]);
        acc[mt][1] = fmaf(f0, d[0][1] + d[1][1], acc[mt][1]);
        acc[mt][2] = fmaf(f1, d[0][2] + d[1][2], acc[mt][2]);
        acc[mt][3] = fmaf(f1, d[0][3] + d[1][3], acc[mt][3]);
      } else {
#pragma unroll
        for (int j = 0; j < PAIRS; j += 2) mma(acc[mt], p0[j], p1[j], p0[j + 1], p1[j + 1], xp[mt][j], xp[mt][j + 1]);
      }
    }
#pragma unroll
    for (int d = 0; d + 1 < D; ++d) ring[d] = ring[d + 1];
    ring[D - 1] = next;
  }

  // the warps' partial sums of the block's 16 rows, added in shared memory ([nwarps][MT * 128])
  extern __shared__ float red[];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < 4; ++i) red[warp * MT * 128 + (mt * 4 + i) * 32 + lane] = acc[mt][i];
  __syncthreads();
  for (int e = threadIdx.x; e < MT * 128; e += blockDim.x) {
    float v = 0.f;
    for (int w = 0; w < nwarps; ++w) v += red[w * MT * 128 + e];
    const int r = e >> 5, ln = e & 31, reg = r & 3;
    const int col = (r >> 2) * 8 + 2 * (ln & 3) + (reg & 1);  // D fragment: c0 c1 row g, c2 c3 row g + 8
    const int row = n0 + (ln >> 2) + 8 * (reg >> 1);
    if (col < a.m && row < a.n) {
      if (a.bias != nullptr) v += __half2float(a.bias[row]);
      a.y[(size_t)col * a.y_stride + row] = __float2half_rn(v);
    }
  }
}

template <int BITS, int MT, int D>
cudaError_t launch_bits(const Args& a, bool scale_after, int warps, cudaStream_t stream) {
  const dim3 grid((a.n + 15) / 16), block(32 * warps);
  const size_t smem = sizeof(float) * warps * MT * 128;
  if (scale_after) {
    mma_gemv_kernel<BITS, MT, true, D><<<grid, block, smem, stream>>>(a);
  } else {
    mma_gemv_kernel<BITS, MT, false, D><<<grid, block, smem, stream>>>(a);
  }
  return cudaGetLastError();
}

template <int BITS>
cudaError_t launch_tiles(const Args& a, bool scale_after, int warps, int depth, cudaStream_t stream) {
  if (a.m <= 8) {
    return depth == 2 ? launch_bits<BITS, 1, 2>(a, scale_after, warps, stream)
                      : launch_bits<BITS, 1, 1>(a, scale_after, warps, stream);
  }
  return depth == 2 ? launch_bits<BITS, 2, 2>(a, scale_after, warps, stream)
                    : launch_bits<BITS, 2, 1>(a, scale_after, warps, stream);
}

}  // namespace

// y[m, n] = x[m, :k] @ W_hat[n, :k]^T (+ bias[n]), float16; returns a cudaError_t (0: launched).
// gshift: log2 of the group size (30 for one group a row); scale_after: each step of 4 chunks lies in
// one group; warps: 1-16, the K split of a block; depth: 1 or 2 steps of weights requested ahead.
extern "C" int hps_mma_gemv(int bits, int scale_after, int warps, int depth, const void* x, const void* qw, const void* scales,
                            const void* qz, const void* bias, void* y, int m, int n, int k, int groups, int gshift,
                            int x_stride, int y_stride, int row_words, int plane_words, int zrow_words, int zplane,
                            void* stream) {
  if (warps < 1 || warps > MAX_WARPS || m < 1 || m > 16 || depth < 1 || depth > 2) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const Args a{static_cast<const half*>(x), static_cast<const uint32_t*>(qw), static_cast<const half*>(scales),
               static_cast<const uint32_t*>(qz), static_cast<const half*>(bias), static_cast<half*>(y),
               m, n, k, groups, gshift, x_stride, y_stride, row_words, plane_words, zrow_words, zplane};
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  cudaError_t err;
  switch (bits) {
    case 2: err = launch_tiles<2>(a, scale_after != 0, warps, depth, st); break;
    case 3: err = launch_tiles<3>(a, scale_after != 0, warps, depth, st); break;
    case 4: err = launch_tiles<4>(a, scale_after != 0, warps, depth, st); break;
    case 8: err = launch_tiles<8>(a, scale_after != 0, warps, depth, st); break;
    default: err = cudaErrorInvalidValue;
  }
  return static_cast<int>(err);
}
