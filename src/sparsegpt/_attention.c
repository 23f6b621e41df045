/* Causal self-attention in float32 by AVX-512 register tiles, for the CPU forwards of calibration,
 * evaluation and generation (attention.py decides when it runs). torch's CPU flash-attention kernel multiplies its
 * blocks by the BLAS, which on AMD EPYC runs float32 products at about half of what AVX-512 reaches there
 * (see solver/_gram.c); the windows here are short (hundreds to a few thousand tokens), so each row's
 * scores fit in L1/L2 and are not blocked over keys.
 *
 *   out[b, h, i] = Σ_{j ≤ i + keys − queries} softmax_j(scale · q[b, h, i] · k[b, h / group, j]) · v[b, h / group, j]
 *
 * for q (batch, heads, queries, dim) and k, v (batch, heads / group, keys, dim), queries <= keys: the
 * queries are the last positions of the keys' sequence (a whole window, or the tokens a generation step
 * adds after those in its cache), each attending to itself and everything before it. Any strides with the
 * last dimension contiguous; grouped-query attention shares one key/value head among `group` query
 * heads. Per (batch, key/value head) the keys are packed once, transposed and zero-padded to whole
 * blocks of 64. The rows it serves, position by position and within a position the query heads that
 * share it, go 6 at a time: their scores against every key up to the last row's (24 zmm
 * sums: 6 rows × 64 keys, fed per dimension by 6 broadcasts and 4 loads), an exact softmax per row
 * (max, exponentials, sum; keys after the row are zero), and the weighted sum of values (6 rows × 64
 * dimensions of sums per pass over the keys, divided by the row's sum at the end). Float32 throughout,
 * in another summation order than torch's kernels. Work is split over OpenMP threads by (batch,
 * key/value head, block of 48 rows), the latest blocks (the longest rows) first. Called through ctypes,
 * which releases the GIL. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { ERROR_ARGUMENTS = -2, ERROR_ISA = -3, ERROR_MEMORY = -4 };
enum { ROWS = 6, KEYS = 64, ROW_BLOCK = 8 * ROWS };

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f,fma")))

static int available(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
}

#include "_exp.h"

/* scores[r][j] = scale · q[r] · keys[j] for `rows` rows (1 to 6, a constant once inlined: the sums stay
 * in registers) of q (row stride `dim`) and keys j < blocks·64 (row stride `padded`), from keys packed in
 * blocks of 64: packed[block][d][j % 64]. */
AVX512 static inline __attribute__((always_inline)) void row_scores(const float *q, const float *packed,
                                                                    int64_t padded, int64_t dim, int64_t blocks,
                                                                    float scale, float *scores, const int rows) {
    for (int64_t block = 0; block < blocks; block++) {
        __m512 sums[ROWS][4];
        _Pragma("GCC unroll 6") for (int r = 0; r < rows; r++)
            _Pragma("GCC unroll 4") for (int v = 0; v < 4; v++) sums[r][v] = _mm512_setzero_ps();
        const float *column = packed + block * dim * KEYS;
        for (int64_t d = 0; d < dim; d++, column += KEYS) {
            __m512 k0 = _mm512_loadu_ps(column), k1 = _mm512_loadu_ps(column + 16);
            __m512 k2 = _mm512_loadu_ps(column + 32), k3 = _mm512_loadu_ps(column + 48);
            _Pragma("GCC unroll 6") for (int r = 0; r < rows; r++) {
                __m512 x = _mm512_set1_ps(q[r * dim + d]);
                sums[r][0] = _mm512_fmadd_ps(x, k0, sums[r][0]);
                sums[r][1] = _mm512_fmadd_ps(x, k1, sums[r][1]);
                sums[r][2] = _mm512_fmadd_ps(x, k2, sums[r][2]);
                sums[r][3] = _mm512_fmadd_ps(x, k3, sums[r][3]);
            }
        }
        __m512 factor = _mm512_set1_ps(scale);
        _Pragma("GCC unroll 6") for (int r = 0; r < rows; r++)
            _Pragma("GCC unroll 4") for (int v = 0; v < 4; v++)
                _mm512_storeu_ps(scores + r * padded + block * KEYS + 16 * v, _mm512_mul_ps(sums[r][v], factor));
    }
}

/* Row `row` of scores (its first `count` entries valid) into exponentials e^(s - max), zero from `count`
 * to `width` (a multiple of 16); returns their sum. */
AVX512 static float softmax_terms(float *row, int64_t count, int64_t width) {
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < count; j += 16) {
        __mmask16 keep = count - j >= 16 ? 0xFFFF : (__mmask16)((1u << (count - j)) - 1);
        top = _mm512_max_ps(top, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), keep, row + j));
    }
    __m512 high = _mm512_set1_ps(_mm512_reduce_max_ps(top)), total = _mm512_setzero_ps();
    for (int64_t j = 0; j < width; j += 16) {
        __mmask16 keep = count - j >= 16 ? 0xFFFF : count > j ? (__mmask16)((1u << (count - j)) - 1) : 0;
        __m512 e = _mm512_maskz_mov_ps(keep, exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(row + j), high)));
        _mm512_storeu_ps(row + j, e);
        total = _mm512_add_ps(total, e);
    }
    return _mm512_reduce_add_ps(total);
}

/* out_r[c] = Σ_{j < keys} weights[r][j] · v[j][c] / totals[r] for `rows` rows (1 to 6, a constant once
 * inlined) and dimensions c < dim (a multiple of 16), 64 at a time. */
AVX512 static inline __attribute__((always_inline)) void weighted_values(const float *weights, int64_t padded,
                                                                         const float *v, int64_t v_stride,
                                                                         int64_t keys, int64_t dim,
                                                                         const float totals[ROWS],
                                                                         float *const out[ROWS], const int rows) {
    for (int64_t start = 0; start < dim; start += 64) {
        int vectors = dim - start >= 64 ? 4 : (int)((dim - start) / 16);
        __mmask16 m0 = 0xFFFF, m1 = vectors > 1 ? 0xFFFF : 0, m2 = vectors > 2 ? 0xFFFF : 0;
        __mmask16 m3 = vectors > 3 ? 0xFFFF : 0;
        __m512 sums[ROWS][4];
        _Pragma("GCC unroll 6") for (int r = 0; r < rows; r++)
            _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) sums[r][i] = _mm512_setzero_ps();
        const float *value = v + start;
        for (int64_t j = 0; j < keys; j++, value += v_stride) {
            __m512 v0 = _mm512_maskz_loadu_ps(m0, value), v1 = _mm512_maskz_loadu_ps(m1, value + 16);
            __m512 v2 = _mm512_maskz_loadu_ps(m2, value + 32), v3 = _mm512_maskz_loadu_ps(m3, value + 48);
            _Pragma("GCC unroll 6") for (int r = 0; r < rows; r++) {
                __m512 w = _mm512_set1_ps(weights[r * padded + j]);
                sums[r][0] = _mm512_fmadd_ps(w, v0, sums[r][0]);
                sums[r][1] = _mm512_fmadd_ps(w, v1, sums[r][1]);
                sums[r][2] = _mm512_fmadd_ps(w, v2, sums[r][2]);
                sums[r][3] = _mm512_fmadd_ps(w, v3, sums[r][3]);
            }
        }
        /* constant indices only (fully unrolled), so that the sums stay in registers */
        _Pragma("GCC unroll 6") for (int r = 0; r < rows; r++) {
            __m512 inverse = _mm512_set1_ps(1.0f / totals[r]);
            _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) {
                if (i >= vectors) break;
                _mm512_storeu_ps(out[r] + start + 16 * i, _mm512_mul_ps(sums[r][i], inverse));
            }
        }
    }
}

typedef struct {
    const void *q, *k, *v; /* float32, or bfloat16 where the flag below says so */
    float *out;
    int64_t batch, heads, group, queries, keys, dim, padded;
    const int64_t *qs, *ks, *vs, *os; /* strides of batch, head, position */
    float scale;
    int32_t q_bf16, k_bf16, v_bf16;
} Problem;

/* 16 floats of row `index` (float32 or bfloat16, widened exactly). */
AVX512 static inline __m512 load16(const void *data, int64_t index, int32_t bf16) {
    if (!bf16) return _mm512_loadu_ps((const float *)data + index);
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)data + index)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

/* `count` consecutive elements from `index` on as float32 (`count` a multiple of 16). */
AVX512 static void widen_row(const void *data, int64_t index, int32_t bf16, int64_t count, float *out) {
    for (int64_t d = 0; d < count; d += 16) _mm512_storeu_ps(out + d, load16(data, index + d, bf16));
}

/* The 16 × 16 floats in rows[0..15] transposed in place (four rounds of shuffles: two within 128-bit lanes,
 * then two of whole lanes). */
AVX512 static inline void transpose16(__m512 rows[16]) {
    __m512 t[16], u[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(rows[i], rows[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(rows[i], rows[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        u[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        u[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_f32x4(u[i], u[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(u[i], u[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_f32x4(u[i + 8], u[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(u[i + 8], u[i + 12], 0xdd);
    }
    for (int i = 0; i < 8; i++) {
        rows[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        rows[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    }
}

/* Keys of (batch b, key/value head g) transposed in blocks of 64 (each block's 64 × dim words
 * contiguous, what one core's L1 cache holds for dim <= 64): packed[j / 64][d][j % 64] = k[b, g, j, d],
 * zero for j >= keys; 16 keys × 16 dimensions at a time, transposed in registers (a generation step
 * packs its whole cache per call: this is as much work as its products). */
AVX512 static void pack_keys(const Problem *p, int64_t b, int64_t g, float *packed) {
    int64_t base = b * p->ks[0] + g * p->ks[1];
    for (int64_t j0 = 0; j0 < p->padded; j0 += 16) {
        float *target = packed + (j0 / KEYS) * p->dim * KEYS + j0 % KEYS;
        for (int64_t d0 = 0; d0 < p->dim; d0 += 16) {
            __m512 rows[16];
            for (int i = 0; i < 16; i++)
                rows[i] = j0 + i < p->keys ? load16(p->k, base + (j0 + i) * p->ks[2] + d0, p->k_bf16) : _mm512_setzero_ps();
            transpose16(rows);
            for (int i = 0; i < 16; i++) _mm512_storeu_ps(target + (d0 + i) * KEYS, rows[i]);
        }
    }
}

/* Values of (batch b, key/value head g) in consecutive rows: packed[j][d] = v[b, g, j, d]. */
AVX512 static void pack_values(const Problem *p, int64_t b, int64_t g, float *packed) {
    int64_t base = b * p->vs[0] + g * p->vs[1];
    for (int64_t j = 0; j < p->keys; j++) widen_row(p->v, base + j * p->vs[2], p->v_bf16, p->dim, packed + j * p->dim);
}

/* One tile: `rows` (1 to 6) query rows, `queries` (rows × dim float32), with the key counts they see. */
AVX512 static inline __attribute__((always_inline)) void attend_tile(const Problem *p, const float *queries,
                                                                     const int64_t seen[ROWS], float *const out[ROWS],
                                                                     const float *packed, const float *v,
                                                                     float *scores, const int rows) {
    int64_t keys = seen[rows - 1], blocks = (keys + KEYS - 1) / KEYS; /* the tile's last row sees the most */
    float totals[ROWS];
    row_scores(queries, packed, p->padded, p->dim, blocks, p->scale, scores, rows);
    for (int r = 0; r < rows; r++) totals[r] = softmax_terms(scores + r * p->padded, seen[r], blocks * KEYS);
    weighted_values(scores, p->padded, v, p->dim, keys, p->dim, totals, out, rows);
}

/* Rows first .. first + count - 1 of key/value head g of batch b. Row r is query position r / group of
 * query head g · group + r % group: the heads that share keys are taken together, so that a tile of rows
 * is whole even when a generation step brings one query per head. `queries`: room for 6 rows of q. */
AVX512 static void attend_rows(const Problem *p, int64_t b, int64_t g, int64_t first, int64_t count,
                               const float *packed, const float *v, float *scores, float *queries) {
    int64_t offset = p->keys - p->queries; /* query position i attends to keys up to i + offset */
    for (int64_t r0 = first; r0 < first + count; r0 += ROWS) {
        int rows = first + count - r0 < ROWS ? (int)(first + count - r0) : ROWS;
        float *out[ROWS];
        int64_t seen[ROWS];
        for (int r = 0; r < rows; r++) {
            int64_t row = r0 + r, i = row / p->group, h = g * p->group + row % p->group;
            widen_row(p->q, b * p->qs[0] + h * p->qs[1] + i * p->qs[2], p->q_bf16, p->dim, queries + r * p->dim);
            out[r] = p->out + b * p->os[0] + h * p->os[1] + i * p->os[2];
            seen[r] = offset + i + 1;
        }
        switch (rows) { /* each count its own code, so that its sums stay in registers */
        case 1: attend_tile(p, queries, seen, out, packed, v, scores, 1); break;
        case 2: attend_tile(p, queries, seen, out, packed, v, scores, 2); break;
        case 3: attend_tile(p, queries, seen, out, packed, v, scores, 3); break;
        case 4: attend_tile(p, queries, seen, out, packed, v, scores, 4); break;
        case 5: attend_tile(p, queries, seen, out, packed, v, scores, 5); break;
        default: attend_tile(p, queries, seen, out, packed, v, scores, 6);
        }
    }
}

static int attend(const Problem *p, int32_t threads) {
    int64_t kv_heads = p->heads / p->group, rows = p->queries * p->group, row_blocks = (rows + ROW_BLOCK - 1) / ROW_BLOCK;
    int64_t packs = p->batch * kv_heads, tasks = packs * row_blocks;
    int64_t size = p->dim * p->padded; /* words per key/value head of packed keys, and of values */
    float *packed = malloc((size_t)(2 * packs * size) * sizeof *packed), *values = packed + packs * size;
    if (packed == NULL) return ERROR_MEMORY;
    int failed = 0;
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        float *scores = malloc((size_t)(ROWS * (p->padded + p->dim)) * sizeof *scores);
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t index = 0; index < packs; index++) {
            pack_keys(p, index / kv_heads, index % kv_heads, packed + index * size);
            pack_values(p, index / kv_heads, index % kv_heads, values + index * size);
        }
        /* the implied barrier: every key packed. Latest row blocks first: they have the most keys. */
#pragma omp for schedule(dynamic, 1)
        for (int64_t index = 0; index < tasks; index++) {
            if (scores == NULL) continue;
            int64_t block = row_blocks - 1 - index / packs, pack = index % packs, first = block * ROW_BLOCK;
            int64_t count = rows - first < ROW_BLOCK ? rows - first : ROW_BLOCK;
            attend_rows(p, pack / kv_heads, pack % kv_heads, first, count, packed + pack * size, values + pack * size,
                        scores, scores + ROWS * p->padded);
        }
        free(scores);
    }
    free(packed);
    return failed ? ERROR_MEMORY : 0;
}
#else
static int available(void) { return 0; }
#endif

/* --- entry points (0, or a negative error) -------------------------------------------------------- */

/* Whether this processor runs the kernel (AVX-512 F). */
int32_t sgpt_attention_available(void) { return available(); }

/* out = causal attention of q (batch, heads, queries, dim) over k and v (batch, heads / group, keys,
 * dim), the queries the keys' last positions (queries <= keys); q, k and v float32 or bfloat16 (bits 0,
 * 1 and 2 of `bf16` set for bfloat16), out float32; strides (of batch, head, position; in elements) in
 * q_strides … out_strides, the last dimension contiguous; `dim` a multiple of 16. */
int64_t sgpt_causal_attention(const void *q, const void *k, const void *v, float *out, int64_t batch, int64_t heads,
                              int64_t group, int64_t queries, int64_t keys, int64_t dim, const int64_t *q_strides,
                              const int64_t *k_strides, const int64_t *v_strides, const int64_t *out_strides, float scale,
                              int32_t bf16, int32_t threads) {
    if (batch < 0 || heads <= 0 || group <= 0 || heads % group != 0 || queries < 0 || keys < queries || dim <= 0 ||
        dim % 16 != 0)
        return ERROR_ARGUMENTS;
    if (!available()) return ERROR_ISA;
    if (batch == 0 || queries == 0) return 0;
#if defined(__GNUC__) && defined(__x86_64__)
    int64_t padded = (keys + KEYS - 1) / KEYS * KEYS;
    Problem p = {q, k, v, out, batch, heads, group, queries, keys, dim, padded,
                 q_strides, k_strides, v_strides, out_strides, scale, bf16 & 1, (bf16 >> 1) & 1, (bf16 >> 2) & 1};
    return attend(&p, threads);
#else
    (void)q, (void)k, (void)v, (void)out, (void)q_strides, (void)k_strides, (void)v_strides, (void)out_strides,
        (void)scale, (void)bf16, (void)threads;
    return ERROR_ISA;
#endif
}

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_attention", .m_doc = "Causal self-attention in float32, called through ctypes.",
    .m_size = -1};

PyMODINIT_FUNC PyInit__attention(void) { return PyModule_Create(&module); }
