/* qcore's own 4-bit CPU kernels for x86-64 with AVX512-BF16 (AMD Zen 4, Intel Sapphire Rapids
 * and newer). Built once per machine by qcore.quant.native (cc -O3 -march=native -fopenmp) and
 * called through ctypes; on any other CPU qc_supported() returns 0 and qcore uses torch's kernel.
 *
 * Output rows live in the vector lanes. Rows come in supertiles of QC_ROWS = 64 (four tiles of
 * 16); input columns in octets of 8. For supertile T and octet c, the 512 codes are 4 x 64 bytes:
 * tile u's 32 uint16 lanes, lane l holding in nibble j the code of
 *     row 64 T + 16 u + l / 2,  column 8 c + 2 j + (l & 1).
 * So the 32 bf16 lanes built from nibble j are, pairwise, the 16 rows' weights at columns
 * (8c + 2j, 8c + 2j + 1), which is what VDPBF16PS multiplies by a broadcast pair of activations,
 * accumulating each row in its own fp32 lane. Scales and zeros are bfloat16, transposed to
 * [N / 64, K / G, 64] so that one group's 16 rows load as one vector; w = s * (q - z).
 *
 * Math: the bf16 with bits 0x4300 | q is exactly 128 + q, so one AND/OR turns a nibble into a
 * bf16 weight. Per group, sum((q - z) x) = sum((128 + q) x) - (z + 128) * sum(x), with sum(x)
 * over the same bf16-rounded activations; a group's fold is one vector FMA per 16 rows.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QC_ABI 4
#define QC_ROWS 64
#ifndef QC_PREFETCH
#define QC_PREFETCH 8 /* octets ahead (an octet of a supertile is 256 bytes) */
#endif
#ifndef QC_CHUNK
#define QC_CHUNK 16 /* most supertiles per work item */
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

/* 16 consecutive bf16 values as fp32 */
static inline __m512 load_bf16x16(const uint16_t *p) {
  __m256i v = _mm256_loadu_si256((const __m256i *)p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

/* nibble j of every uint16 lane as the bf16 number 128 + q */
static inline __m512i nibble_bf16(__m512i v, int j) {
  const __m512i lo4 = _mm512_set1_epi16(0x000F), bias = _mm512_set1_epi16(0x4300);
  return _mm512_ternarylogic_epi32(j ? _mm512_srli_epi16(v, 4 * j) : v, lo4, bias, 0xEA); /* (c & 0xF) | bias */
}

static inline void prefetch_octet(const uint16_t *p) {
  const char *q = (const char *)(p + QC_PREFETCH * QC_ROWS * 2);
  _mm_prefetch(q, _MM_HINT_T0);
  _mm_prefetch(q + 64, _MM_HINT_T0);
  _mm_prefetch(q + 128, _MM_HINT_T0);
  _mm_prefetch(q + 192, _MM_HINT_T0);
}

/* one activation row: supertiles [t0, t1). xp: bf16 activations as 32-bit pairs; xs: group sums */
static void gemv_supertiles(const uint16_t *w, const uint16_t *s, const uint16_t *z, const uint32_t *xp,
                            const float *xs, float *y, int K, int G, int t0, int t1) {
  const int ng = K / G, opg = G / 8, noct = K / 8;
  const __m512 c128 = _mm512_set1_ps(128.f);
  for (int t = t0; t < t1; t++) {
    const uint16_t *tw = w + (size_t)t * noct * QC_ROWS * 2;
    __m512 acc[4];
    for (int u = 0; u < 4; u++) acc[u] = _mm512_setzero_ps();
    for (int g = 0; g < ng; g++) {
      __m512 ga[4][2];
      for (int u = 0; u < 4; u++) ga[u][0] = ga[u][1] = _mm512_setzero_ps();
      for (int c = g * opg; c < (g + 1) * opg; c++) {
        const uint16_t *p = tw + (size_t)c * QC_ROWS * 2;
        prefetch_octet(p);
        __m512i v[4];
        for (int u = 0; u < 4; u++) v[u] = _mm512_loadu_si512(p + 32 * u);
        for (int j = 0; j < 4; j++) {
          __m512i xv = _mm512_set1_epi32((int)xp[4 * c + j]);
          for (int u = 0; u < 4; u++)
            ga[u][j & 1] = _mm512_dpbf16_ps(ga[u][j & 1], (__m512bh)nibble_bf16(v[u], j), (__m512bh)xv);
        }
      }
      const __m512 xsum = _mm512_set1_ps(xs[g]);
      const uint16_t *sg = s + ((size_t)t * ng + g) * QC_ROWS, *zg = z + ((size_t)t * ng + g) * QC_ROWS;
      for (int u = 0; u < 4; u++) {
        __m512 d = _mm512_add_ps(ga[u][0], ga[u][1]);
        d = _mm512_fnmadd_ps(_mm512_add_ps(load_bf16x16(zg + 16 * u), c128), xsum, d);
        acc[u] = _mm512_fmadd_ps(load_bf16x16(sg + 16 * u), d, acc[u]);
      }
    }
    for (int u = 0; u < 4; u++) _mm512_storeu_ps(y + (size_t)t * QC_ROWS + 16 * u, acc[u]);
  }
}

/* QC_MB activation rows at once (rows beyond mb are zeros): each unpacked weight vector is used
   QC_MB times; two tiles at a time keep the accumulators in registers. */
#define QC_MB 4
static void gemm_supertiles(const uint16_t *w, const uint16_t *s, const uint16_t *z, const uint32_t *xp,
                            const float *xs, float *y, int mb, int N, int K, int G, int t0, int t1) {
  const int ng = K / G, opg = G / 8, noct = K / 8;
  const __m512 c128 = _mm512_set1_ps(128.f);
  for (int t = t0; t < t1; t++) {
    const uint16_t *tw = w + (size_t)t * noct * QC_ROWS * 2;
    for (int u0 = 0; u0 < 4; u0 += 2) {
      __m512 acc[QC_MB][2];
      for (int m = 0; m < QC_MB; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
      for (int g = 0; g < ng; g++) {
        __m512 ga[QC_MB][2];
        for (int m = 0; m < QC_MB; m++) ga[m][0] = ga[m][1] = _mm512_setzero_ps();
        for (int c = g * opg; c < (g + 1) * opg; c++) {
          const uint16_t *p = tw + (size_t)c * QC_ROWS * 2 + 32 * u0;
          __m512i v0 = _mm512_loadu_si512(p), v1 = _mm512_loadu_si512(p + 32);
          for (int j = 0; j < 4; j++) {
            __m512i w0 = nibble_bf16(v0, j), w1 = nibble_bf16(v1, j);
            for (int m = 0; m < QC_MB; m++) {
              __m512i xv = _mm512_set1_epi32((int)xp[(size_t)m * (K / 2) + 4 * c + j]);
              ga[m][0] = _mm512_dpbf16_ps(ga[m][0], (__m512bh)w0, (__m512bh)xv);
              ga[m][1] = _mm512_dpbf16_ps(ga[m][1], (__m512bh)w1, (__m512bh)xv);
            }
          }
        }
        const uint16_t *sg = s + ((size_t)t * ng + g) * QC_ROWS, *zg = z + ((size_t)t * ng + g) * QC_ROWS;
        for (int h = 0; h < 2; h++) {
          __m512 sv = load_bf16x16(sg + 16 * (u0 + h));
          __m512 zv = _mm512_add_ps(load_bf16x16(zg + 16 * (u0 + h)), c128);
          for (int m = 0; m < QC_MB; m++) {
            __m512 d = _mm512_fnmadd_ps(zv, _mm512_set1_ps(xs[(size_t)m * ng + g]), ga[m][h]);
            acc[m][h] = _mm512_fmadd_ps(sv, d, acc[m][h]);
          }
        }
      }
      for (int m = 0; m < mb; m++)
        for (int h = 0; h < 2; h++)
          _mm512_storeu_ps(y + (size_t)m * N + (size_t)t * QC_ROWS + 16 * (u0 + h), acc[m][h]);
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

/* work items of up to QC_CHUNK supertiles (about four per thread at least), taken as threads
   finish: a thread that starts late (a vCPU descheduled, a core busy) does not hold up the call */
static int chunk_size(int supertiles, int nthreads) {
  int chunk = supertiles / (4 * nthreads);
  return chunk < 1 ? 1 : chunk > QC_CHUNK ? QC_CHUNK : chunk;
}

/* y [M, N] = x [M, K] @ w_hat.T (fp32 in and out; bf16 activations inside); N % 64 == 0 */
void qc_q4_gemv(const uint16_t *w, const uint16_t *s, const uint16_t *z, const float *x, float *y,
                int M, int N, int K, int G, int nthreads) {
  const int ng = K / G, supertiles = N / QC_ROWS, chunk = chunk_size(supertiles, nthreads);
  const int nchunks = (supertiles + chunk - 1) / chunk;
  uint16_t *xb = (uint16_t *)calloc((size_t)QC_MB * K, 2);
  float *xs = (float *)calloc((size_t)QC_MB * ng, sizeof(float));
  const int by_row = M < QC_MB; /* 2 or 3 rows: one streaming pass per row beats a padded block */
  for (int m0 = 0; m0 < M; m0 += (by_row ? 1 : QC_MB)) {
    int mb = by_row ? 1 : M - m0 < QC_MB ? M - m0 : QC_MB;
    if (!by_row) memset(xb, 0, (size_t)QC_MB * K * 2);
    for (int m = 0; m < mb; m++) prep_x(x + (size_t)(m0 + m) * K, xb + (size_t)m * K, xs + (size_t)m * ng, K, G);
    float *yr = y + (size_t)m0 * N;
    const uint32_t *xp = (const uint32_t *)xb;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int c = 0; c < nchunks; c++) {
      int a = c * chunk, b = a + chunk < supertiles ? a + chunk : supertiles;
      if (by_row) gemv_supertiles(w, s, z, xp, xs, yr, K, G, a, b);
      else gemm_supertiles(w, s, z, xp, xs, yr, mb, N, K, G, a, b);
    }
  }
  free(xb);
  free(xs);
}

/* one group's scales and zeros for the 16 rows of tile u (lane r = row r), as the two constants of
   octet_pairs: s16 = 16 s and c = s (z + 16), both exact in fp32 (bf16 s and z) */
typedef struct { __m512 s16, c; } group_sz;

static inline group_sz load_group(const uint16_t *s, const uint16_t *z, int t, int ng, int g, int u) {
  __m512 sv = load_bf16x16(s + ((size_t)t * ng + g) * QC_ROWS + 16 * u);
  __m512 zv = load_bf16x16(z + ((size_t)t * ng + g) * QC_ROWS + 16 * u);
  __m512 s16 = _mm512_mul_ps(sv, _mm512_set1_ps(16.f));
  group_sz gs = {s16, _mm512_fmadd_ps(sv, zv, s16)};
  return gs;
}

/* nibble at bit `at` of each 32-bit lane -> the fp32 1 + q / 16 (exact: q in mantissa bits 19..22) */
static inline __m512 nibble_f32(__m512i v, int at) {
  const __m512i mask = _mm512_set1_epi32(0xF << 19), one = _mm512_set1_epi32(0x3F800000);
  __m512i q = at <= 19 ? _mm512_slli_epi32(v, 19 - at) : _mm512_srli_epi32(v, at - 19);
  return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(q, mask, one, 0xEA)); /* (q & mask) | one */
}

/* one tile's octet (uint16 lanes of 4 nibbles; 32-bit lane r holds row r's columns 2j and 2j + 1 in
   nibble j of its low and high half) -> pairs[j]: 32-bit lane r = row r's bf16 weights s * (q - z)
   at columns 2j, 2j + 1 (a row of an AMX B tile in VNNI order). (1 + q / 16) * 16 s - s (z + 16)
   is s (q - z) exactly before its one rounding, as (q - z) * s is: the same bits. */
static inline void octet_pairs(__m512i v, const group_sz *gs, __m512i pairs[4]) {
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                              23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int j = 0; j < 4; j++) {
    __m512 lo = _mm512_fmsub_ps(nibble_f32(v, 4 * j), gs->s16, gs->c);
    __m512 hi = _mm512_fmsub_ps(nibble_f32(v, 16 + 4 * j), gs->s16, gs->c);
    pairs[j] = _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
}

/* out [N, K] bf16 = s * (q - z), for batches where a dense bf16 matmul beats the kernel. A tile's
   16 output rows are K * 2 bytes apart (the same L1 set for K a multiple of 2048): four octets
   (32 columns, one 64-byte line per row) are assembled in a 1 KiB local tile and then stored as
   whole lines, so that no line is written piecewise while 15 other rows compete for its set. */
void qc_q4_dequant_bf16(const uint16_t *w, const uint16_t *s, const uint16_t *z, uint16_t *out,
                        int N, int K, int G, int nthreads) {
  const int ng = K / G, noct = K / 8, supertiles = N / QC_ROWS;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int t = 0; t < supertiles; t++) {
    uint16_t tile[16][32] __attribute__((aligned(64))); /* 16 rows x 4 octets */
    for (int u = 0; u < 4; u++) {
      const size_t row0 = (size_t)t * QC_ROWS + 16 * u;
      for (int g = 0; g < ng; g++) {
        group_sz gs = load_group(s, z, t, ng, g, u);
        for (int c0 = g * (G / 8); c0 < (g + 1) * (G / 8); c0 += 4) { /* G % 32 == 0 */
          for (int cc = 0; cc < 4; cc++) {
            __m512i v = _mm512_loadu_si512(w + ((size_t)t * noct + c0 + cc) * QC_ROWS * 2 + 32 * u);
            __m512i pairs[4];
            octet_pairs(v, &gs, pairs);
            /* transpose 4 x 16 dwords so each row's 8 columns are one 128-bit lane */
            __m512i t0 = _mm512_unpacklo_epi32(pairs[0], pairs[1]), t1 = _mm512_unpackhi_epi32(pairs[0], pairs[1]);
            __m512i t2 = _mm512_unpacklo_epi32(pairs[2], pairs[3]), t3 = _mm512_unpackhi_epi32(pairs[2], pairs[3]);
            __m512i r[4] = {_mm512_unpacklo_epi64(t0, t2), _mm512_unpackhi_epi64(t0, t2),
                            _mm512_unpacklo_epi64(t1, t3), _mm512_unpackhi_epi64(t1, t3)};
            for (int i = 0; i < 4; i++) { /* r[i] lane q holds row 4 q + i */
              _mm_store_si128((__m128i *)&tile[i][8 * cc], _mm512_extracti32x4_epi32(r[i], 0));
              _mm_store_si128((__m128i *)&tile[4 + i][8 * cc], _mm512_extracti32x4_epi32(r[i], 1));
              _mm_store_si128((__m128i *)&tile[8 + i][8 * cc], _mm512_extracti32x4_epi32(r[i], 2));
              _mm_store_si128((__m128i *)&tile[12 + i][8 * cc], _mm512_extracti32x4_epi32(r[i], 3));
            }
          }
          for (int i = 0; i < 16; i++)
            _mm512_storeu_si512(out + (row0 + i) * (size_t)K + 8 * (size_t)c0, _mm512_load_si512(tile[i]));
        }
      }
    }
  }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
/* AMX (Intel Sapphire Rapids and newer): batches as tiles. For each supertile of 64 output rows,
   the weights are dequantized (octet_pairs, the same values as qc_q4_dequant_bf16) into four B
   panels of VNNI rows (K * 32 bytes each, held in L2) once per QC_MC activation rows; 16 or 32
   activation rows at a time then run TDPBF16PS over the whole of K, 2 x 2 tiles, with the fp32
   accumulators in tiles until they are stored into y.
   The linux kernel hands out AMX state on request (arch_prctl); without it, or on a CPU without
   AMX, qc_amx_supported() returns 0. */
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#ifndef QC_MC
#define QC_MC 256 /* activation rows per panel reuse */
#endif
#define QC_ARCH_REQ_XCOMP_PERM 0x1023
#define QC_XFEATURE_XTILEDATA 18

int qc_amx_supported(void) {
  static int ok = -1;
  if (ok < 0) ok = syscall(SYS_arch_prctl, QC_ARCH_REQ_XCOMP_PERM, QC_XFEATURE_XTILEDATA) == 0;
  return ok;
}

typedef struct {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} qc_tilecfg;

/* tiles 0, 1: activations (16 rows x 32 bf16); 2, 3: weight panels (16 column pairs x 16 rows);
   4..7: fp32 accumulators (16 activation rows x 16 output rows) */
static void amx_config(void) {
  qc_tilecfg cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int i = 0; i < 8; i++) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = 16;
  }
  _tile_loadconfig(&cfg);
}

/* supertile t -> four panels (tile u at panel + u * K * 8): VNNI rows 4 c + j of 16 dwords each,
   read as one sequential stream with the next octets prefetched */
static void build_panels(const uint16_t *w, const uint16_t *s, const uint16_t *z, int K, int G, int t,
                         uint32_t *panel) {
  const int ng = K / G, noct = K / 8;
  const uint16_t *tw = w + (size_t)t * noct * QC_ROWS * 2;
  group_sz gs[4];
  for (int c = 0; c < noct; c++) {
    if ((8 * c) % G == 0)
      for (int u = 0; u < 4; u++) gs[u] = load_group(s, z, t, ng, (8 * c) / G, u);
    const uint16_t *p = tw + (size_t)c * QC_ROWS * 2;
    prefetch_octet(p);
    for (int u = 0; u < 4; u++) {
      __m512i pairs[4];
      octet_pairs(_mm512_loadu_si512(p + 32 * u), &gs[u], pairs);
      uint32_t *row = panel + (size_t)u * K * 8 + (size_t)c * 64;
      for (int j = 0; j < 4; j++) _mm512_store_si512(row + 16 * j, pairs[j]);
    }
  }
}

/* accumulator tile T to y at element offset off: fp32 rows, or bf16 rows (round to nearest even)
   through a 1 KiB buffer */
#define QC_STORE_C(T, off)                                                                   \
  do {                                                                                       \
    if (bf16_out) {                                                                          \
      _tile_stored(T, cbuf, 64);                                                             \
      for (int r = 0; r < 16; r++)                                                           \
        _mm256_storeu_si256((__m256i *)((uint16_t *)y + (off) + (size_t)r * N),             \
                            (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(cbuf + 16 * r)));    \
    } else {                                                                                 \
      _tile_stored(T, (float *)y + (off), ys);                                               \
    }                                                                                        \
  } while (0)

/* output columns [n0, n0 + 32) (tiles u0, u0 + 1 of a supertile) for activation rows [m0, m1):
   2 x 2 tiles over all of K */
static void amx_rows(const uint32_t *panel0, const uint32_t *panel1, const uint16_t *xb, void *y, int bf16_out,
                     size_t n0, int m0, int m1, int N, int K) {
  const size_t xs = (size_t)K * 2, ys = (size_t)N * 4;
  float cbuf[256] __attribute__((aligned(64)));
  for (int m = m0; m < m1; m += 32) {
    const size_t yb = (size_t)m * N + n0, yb16 = yb + 16 * (size_t)N;
    const uint16_t *xa = xb + (size_t)m * K;
    _tile_zero(4);
    _tile_zero(5);
    if (m + 16 < m1) {
      _tile_zero(6);
      _tile_zero(7);
      for (int k = 0; k < K; k += 32) {
        _tile_loadd(2, panel0 + k / 2 * 16, 64);
        _tile_loadd(3, panel1 + k / 2 * 16, 64);
        _tile_loadd(0, xa + k, xs);
        _tile_loadd(1, xa + 16 * (size_t)K + k, xs);
        _tile_dpbf16ps(4, 0, 2);
        _tile_dpbf16ps(5, 0, 3);
        _tile_dpbf16ps(6, 1, 2);
        _tile_dpbf16ps(7, 1, 3);
      }
      QC_STORE_C(6, yb16);
      QC_STORE_C(7, yb16 + 16);
    } else {
      for (int k = 0; k < K; k += 32) {
        _tile_loadd(2, panel0 + k / 2 * 16, 64);
        _tile_loadd(3, panel1 + k / 2 * 16, 64);
        _tile_loadd(0, xa + k, xs);
        _tile_dpbf16ps(4, 0, 2);
        _tile_dpbf16ps(5, 0, 3);
      }
    }
    QC_STORE_C(4, yb);
    QC_STORE_C(5, yb + 16);
  }
}

/* y [M, N] = xb [M, K] (bf16 bits) @ w_hat.T, fp32 or (bf16_out) bf16; M % 16 == 0, N % 64 == 0,
   K % 32 == 0 */
void qc_q4_amx(const uint16_t *w, const uint16_t *s, const uint16_t *z, const uint16_t *xb, void *y,
               int M, int N, int K, int G, int nthreads, int bf16_out) {
  const int supertiles = N / QC_ROWS;
  if (!qc_amx_supported()) abort(); /* requests the AMX state on first use */
#pragma omp parallel num_threads(nthreads)
  {
    uint32_t *panel = (uint32_t *)aligned_alloc(64, (size_t)K * 128);
    amx_config();
#pragma omp for schedule(dynamic, 1)
    for (int t = 0; t < supertiles; t++) {
      for (int m0 = 0; m0 < M; m0 += QC_MC) {
        const int m1 = m0 + QC_MC < M ? m0 + QC_MC : M;
        build_panels(w, s, z, K, G, t, panel);
        const size_t n0 = (size_t)t * QC_ROWS;
        amx_rows(panel, panel + (size_t)K * 8, xb, y, bf16_out, n0, m0, m1, N, K);
        amx_rows(panel + (size_t)K * 16, panel + (size_t)K * 24, xb, y, bf16_out, n0 + 32, m0, m1, N, K);
      }
    }
    free(panel);

    _tile_release();
  }
}
#else
int qc_amx_supported(void) { return 0; }
void qc_q4_amx(const uint16_t *w, const uint16_t *s, const uint16_t *z, const uint16_t *xb, void *y,
               int M, int N, int K, int G, int nthreads, int bf16_out) { abort(); }
#endif

#else
int qc_supported(void) { return 0; }
int qc_amx_supported(void) { return 0; }
void qc_q4_amx(const uint16_t *w, const uint16_t *s, const uint16_t *z, const uint16_t *xb, void *y,
               int M, int N, int K, int G, int nthreads, int bf16_out) { abort(); }
void qc_q4_gemv(const uint16_t *w, const uint16_t *s, const uint16_t *z, const float *x, float *y,
                int M, int N, int K, int G, int nthreads) { abort(); }
void qc_q4_dequant_bf16(const uint16_t *w, const uint16_t *s, const uint16_t *z, uint16_t *out,
                        int N, int K, int G, int nthreads) { abort(); }
#endif
