/* qcore's own 4-bit CPU kernels for x86-64 with AVX512-BF16 (AMD Zen 4, Intel Sapphire Rapids
 * and newer). Built once per machine by qcore.quant.native (cc -O3 -march=native -fopenmp) and
 * called through ctypes; on any other CPU qc_supported() returns 0 and qcore uses torch's kernel.
 *
 * Layout ("tiled"): output rows in tiles of QC_ROWS; in tile t, block b (QC_BLOCK = 128 input
 * columns) is QC_ROWS rows x 32 uint16 lanes, contiguous, so a tile streams as one sequential
 * read. Lane l of row r holds the codes of columns 128 b + l + 32 j in nibble j (j = 0..3).
 * K must be a multiple of 32; the last block of a K that 128 does not divide is padded with
 * zero codes, and the kernels skip its missing 32-column slices.
 * scales and zeros: bfloat16 [N, K / G] (the values QuantLinear stores), w = s * (q - z).
 *
 * Math: the bf16 with bits 0x4300 | q is exactly 128 + q, so one AND/OR turns a nibble into a
 * bf16 weight and VDPBF16PS accumulates (128 + q) * bf16(x) in fp32. Per group,
 *   sum((q - z) x) = sum((128 + q) x) - (z + 128) * sum(x),
 * with sum(x) taken over the same bf16-rounded activations.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QC_ABI 1
#define QC_ROWS 4
#define QC_BLOCK 128
#ifndef QC_HINT
#define QC_HINT _MM_HINT_NTA /* weights are read once: keep them from evicting x out of L1 */
#endif
#ifndef QC_CHUNK
#define QC_CHUNK 64 /* most tiles per work item */
#endif
#ifndef QC_PREFETCH
#define QC_PREFETCH 8 /* blocks ahead (a block of a tile is QC_ROWS x 64 bytes) */
#endif

int qc_abi(void) { return QC_ABI; }

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512F__)
#include <immintrin.h>
#include <omp.h>

int qc_supported(void) { return 1; }

static inline float bf16_to_f32(uint16_t v) {
  uint32_t u = (uint32_t)v << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* 16 bf16 values (masked to n) as fp32 */
static inline __m512 load_bf16x16(const uint16_t *p, int n) {
  __mmask16 m = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
  __m256i v = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

/* sum over groups of s * (z + 128) * xs for one row */
static float zero_term(const uint16_t *s, const uint16_t *z, const float *xs, int ng) {
  __m512 acc = _mm512_setzero_ps();
  const __m512 c128 = _mm512_set1_ps(128.f);
  for (int g = 0; g < ng; g += 16) {
    int n = ng - g < 16 ? ng - g : 16;
    __mmask16 m = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
    __m512 sv = load_bf16x16(s + g, n), zv = load_bf16x16(z + g, n);
    __m512 xv = _mm512_maskz_loadu_ps(m, xs + g);
    acc = _mm512_fmadd_ps(_mm512_mul_ps(sv, _mm512_add_ps(zv, c128)), xv, acc);
  }
  return _mm512_reduce_add_ps(acc);
}

/* rows of tiles [t0, t1) for one activation row (xb: bf16 bits, xs: per-group sums) */
#define NBLOCKS(K) (((K) + QC_BLOCK - 1) / QC_BLOCK)
#define LAST_SLICES(K) ((K) % QC_BLOCK ? ((K) % QC_BLOCK) / 32 : 4)

static void gemv_tiles(const uint16_t *w, const uint16_t *s, const uint16_t *z, const uint16_t *xb,
                       const float *xs, float *y, int K, int G, int t0, int t1) {
  const int ng = K / G, nb = NBLOCKS(K), last = LAST_SLICES(K), slices_per_group = G / 32;
  const __m512i lo4 = _mm512_set1_epi16(0x000F), bias = _mm512_set1_epi16(0x4300);
  for (int t = t0; t < t1; t++) {
    const uint16_t *tw = w + (size_t)t * nb * QC_ROWS * 32;
    const size_t row0 = (size_t)t * QC_ROWS;
    __m512 acc[QC_ROWS], ga[QC_ROWS][2];
    for (int r = 0; r < QC_ROWS; r++) {
      acc[r] = _mm512_setzero_ps();
      ga[r][0] = ga[r][1] = _mm512_setzero_ps();
    }
    int slice = 0, g = 0;
    for (int b = 0; b < nb; b++) {
      const uint16_t *p = tw + (size_t)b * QC_ROWS * 32;
      for (int r = 0; r < QC_ROWS; r++)
        _mm_prefetch((const char *)(p + QC_PREFETCH * QC_ROWS * 32 + r * 32), QC_HINT);
      __m512i v[QC_ROWS];
      for (int r = 0; r < QC_ROWS; r++) v[r] = _mm512_loadu_si512(p + r * 32);
      const int js = b == nb - 1 ? last : 4;
      for (int j = 0; j < 4; j++) {
        if (j == js) break;
        __m512i xv = _mm512_loadu_si512(xb + b * QC_BLOCK + 32 * j);
        for (int r = 0; r < QC_ROWS; r++) {
          __m512i c = j ? _mm512_srli_epi16(v[r], 4 * j) : v[r];
          c = _mm512_ternarylogic_epi32(c, lo4, bias, 0xEA); /* (c & 0xF) | 0x4300 */
          ga[r][j & 1] = _mm512_dpbf16_ps(ga[r][j & 1], (__m512bh)c, (__m512bh)xv);
        }
        if (++slice == slices_per_group) { /* group g complete: scale and fold */
          for (int r = 0; r < QC_ROWS; r++) {
            float sv = bf16_to_f32(s[(row0 + r) * ng + g]);
            acc[r] = _mm512_fmadd_ps(_mm512_add_ps(ga[r][0], ga[r][1]), _mm512_set1_ps(sv), acc[r]);
            ga[r][0] = ga[r][1] = _mm512_setzero_ps();
          }
          slice = 0;
          g++;
        }
      }
    }
    for (int r = 0; r < QC_ROWS; r++)
      y[row0 + r] = _mm512_reduce_add_ps(acc[r]) - zero_term(s + (row0 + r) * ng, z + (row0 + r) * ng, xs, ng);
  }
}

/* MB activation rows at once (rows beyond M are zeros): each weight slice is unpacked once and
   used MB times; two output rows at a time keep the accumulators in registers. */
#define QC_MB 4
static void gemm_tiles(const uint16_t *w, const uint16_t *s, const uint16_t *z, const uint16_t *xb,
                       const float *xs, float *y, int mb, int N, int K, int G, int t0, int t1) {
  const int ng = K / G, nb = NBLOCKS(K), last = LAST_SLICES(K), slices_per_group = G / 32;
  const __m512i lo4 = _mm512_set1_epi16(0x000F), bias = _mm512_set1_epi16(0x4300);
  for (int t = t0; t < t1; t++) {
    const uint16_t *tw = w + (size_t)t * nb * QC_ROWS * 32;
    for (int r0 = 0; r0 < QC_ROWS; r0 += 2) {
      const size_t row0 = (size_t)t * QC_ROWS + r0;
      __m512 acc[QC_MB][2], ga[QC_MB][2];
      for (int m = 0; m < QC_MB; m++)
        for (int r = 0; r < 2; r++) acc[m][r] = ga[m][r] = _mm512_setzero_ps();
      int slice = 0, g = 0;
      for (int b = 0; b < nb; b++) {
        const uint16_t *p = tw + (size_t)b * QC_ROWS * 32 + r0 * 32;
        __m512i v0 = _mm512_loadu_si512(p), v1 = _mm512_loadu_si512(p + 32);
        const int js = b == nb - 1 ? last : 4;
        for (int j = 0; j < 4; j++) {
          if (j == js) break;
          __m512i c0 = _mm512_ternarylogic_epi32(j ? _mm512_srli_epi16(v0, 4 * j) : v0, lo4, bias, 0xEA);
          __m512i c1 = _mm512_ternarylogic_epi32(j ? _mm512_srli_epi16(v1, 4 * j) : v1, lo4, bias, 0xEA);
          for (int m = 0; m < QC_MB; m++) {
            __m512i xv = _mm512_loadu_si512(xb + (size_t)m * K + b * QC_BLOCK + 32 * j);
            ga[m][0] = _mm512_dpbf16_ps(ga[m][0], (__m512bh)c0, (__m512bh)xv);
            ga[m][1] = _mm512_dpbf16_ps(ga[m][1], (__m512bh)c1, (__m512bh)xv);
          }
          if (++slice == slices_per_group) {
            for (int r = 0; r < 2; r++) {
              __m512 sv = _mm512_set1_ps(bf16_to_f32(s[(row0 + r) * ng + g]));
              for (int m = 0; m < QC_MB; m++) {
                acc[m][r] = _mm512_fmadd_ps(ga[m][r], sv, acc[m][r]);
                ga[m][r] = _mm512_setzero_ps();
              }
            }
            slice = 0;
            g++;
          }
        }
      }
      for (int m = 0; m < mb; m++)
        for (int r = 0; r < 2; r++)
          y[(size_t)m * N + row0 + r] = _mm512_reduce_add_ps(acc[m][r]) -
              zero_term(s + (row0 + r) * ng, z + (row0 + r) * ng, xs + (size_t)m * ng, ng);
    }
  }
}

/* activation rows -> bf16 bits (round to nearest even) and per-group sums of those */
static void prep_x(const float *x, uint16_t *xb, float *xs, int K, int G) {
  for (int k = 0; k < K; k += 16) {
    __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(x + k));
    _mm256_storeu_si256((__m256i *)(xb + k), (__m256i)h);
  }
  for (int g = 0; g < K / G; g++) {
    float acc = 0.f;
    for (int k = g * G; k < (g + 1) * G; k++) acc += bf16_to_f32(xb[k]);
    xs[g] = acc;
  }
}

/* y [M, N] = x [M, K] @ w_hat.T (fp32 in and out; bf16 activations inside) */
void qc_q4_gemv(const uint16_t *w, const uint16_t *s, const uint16_t *z, const float *x, float *y,
                int M, int N, int K, int G, int nthreads) {
  const int ng = K / G, tiles = N / QC_ROWS;
  uint16_t *xb = (uint16_t *)calloc((size_t)QC_MB * K, 2);
  float *xs = (float *)calloc((size_t)QC_MB * ng, sizeof(float));
  for (int m0 = 0; m0 < M; m0 += (M == 1 ? 1 : QC_MB)) {
    int mb = M - m0 < QC_MB ? M - m0 : QC_MB;
    if (M > 1) memset(xb, 0, (size_t)QC_MB * K * 2);
    for (int m = 0; m < mb; m++) prep_x(x + (size_t)(m0 + m) * K, xb + (size_t)m * K, xs + (size_t)m * ng, K, G);
    float *yr = y + (size_t)m0 * N;
    /* work items of up to QC_CHUNK tiles (at least 4 per thread), taken as threads finish: a
       thread that starts late (a vCPU descheduled, a core busy) does not hold up the call */
    int chunk = tiles / (4 * nthreads);
    chunk = chunk < 1 ? 1 : chunk > QC_CHUNK ? QC_CHUNK : chunk;
    const int nchunks = (tiles + chunk - 1) / chunk;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int c = 0; c < nchunks; c++) {
      int a = c * chunk, b = a + chunk < tiles ? a + chunk : tiles;
      if (M == 1) gemv_tiles(w, s, z, xb, xs, yr, K, G, a, b);
      else gemm_tiles(w, s, z, xb, xs, yr, mb, N, K, G, a, b);
    }
  }
  free(xb);
  free(xs);
}

/* out [N, K] bf16 = s * (q - z), for batches where a dense bf16 matmul beats the GEMV */
void qc_q4_dequant_bf16(const uint16_t *w, const uint16_t *s, const uint16_t *z, uint16_t *out,
                        int N, int K, int G, int nthreads) {
  const int ng = K / G, nb = NBLOCKS(K), last = LAST_SLICES(K), tiles = N / QC_ROWS;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int t = 0; t < tiles; t++) {
    const __m512i lo4 = _mm512_set1_epi16(0x000F);
    for (int r = 0; r < QC_ROWS; r++) {
      const size_t n = (size_t)t * QC_ROWS + r;
      for (int b = 0; b < nb; b++) {
        __m512i v = _mm512_loadu_si512(w + ((size_t)t * nb + b) * QC_ROWS * 32 + r * 32);
        for (int j = 0; j < (b == nb - 1 ? last : 4); j++) {
          int k0 = b * QC_BLOCK + 32 * j, g = k0 / G;
          __m512 sv = _mm512_set1_ps(bf16_to_f32(s[n * ng + g]));
          __m512 zv = _mm512_set1_ps(bf16_to_f32(z[n * ng + g]));
          __m512i c = _mm512_and_si512(_mm512_srli_epi16(v, 4 * j), lo4);
          __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(c)));
          __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(c, 1)));
          lo = _mm512_mul_ps(_mm512_sub_ps(lo, zv), sv);
          hi = _mm512_mul_ps(_mm512_sub_ps(hi, zv), sv);
          __m512bh h = _mm512_cvtne2ps_pbh(hi, lo);
          _mm512_storeu_si512(out + n * K + k0, (__m512i)h);
        }
      }
    }
  }
}

#else
int qc_supported(void) { return 0; }
void qc_q4_gemv(const uint16_t *w, const uint16_t *s, const uint16_t *z, const float *x, float *y,
                int M, int N, int K, int G, int nthreads) { abort(); }
void qc_q4_dequant_bf16(const uint16_t *w, const uint16_t *s, const uint16_t *z, uint16_t *out,
                        int N, int K, int G, int nthreads) { abort(); }
#endif
