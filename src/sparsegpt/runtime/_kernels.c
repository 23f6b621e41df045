/* Products with a pruned weight in its compact encoding (docs/FORMAT.md), without a dense copy of it.
 *
 * The weight is a (rows, cols) matrix Ŵ held as
 *   - a bitmask of rows·cols bits in row-major order (1 = kept), or none when every entry is kept;
 *   - `offsets`, rows + 1 integers: the index of each row's first kept entry (derived at load time);
 *   - the kept entries in row-major order: stored values (float32, bfloat16 or float16), or B-bit codes
 *     in a little-endian bit stream with a float16 scale and a uint8 zero point per row and group of
 *     `group` columns. Code q of group (s, z) stands for (q − z)·s computed in float32 and then rounded
 *     to the weight's dtype, exactly as the compact reader decodes it.
 *
 * Two operations, each with a portable loop (the reference, any shape and encoding) and vector loops
 * chosen at run time for the shapes they cover:
 *   sgpt_matvec   y = x·Ŵᵀ for a few vectors x (decoding tokens), accumulated in float32;
 *   sgpt_densify  a band of rows of Ŵ written densely (a scratch tile for products with many vectors).
 * AVX-512 (F, BW, VL, VBMI2): 32 columns at a time, a 32-bit slice of the mask placing the next kept
 * values with one expand instruction (the approach of SparAMX, arXiv 2502.12444); with AVX512_BF16, bf16
 * inputs meet bf16 weights in its dot product, and 4-bit codes go 64 columns at a time in byte lanes
 * (VBMI). AVX2 (with FMA and F16C): 8 columns at a time from a table of in-register permutations, stored
 * values or codes of up to 4 bits or of 8. Rows are split over `threads` OpenMP threads. Called through
 * ctypes, which releases the GIL. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../formats/_encoding.h"

enum { KIND_FLOAT32 = 0, KIND_BFLOAT16 = 1, KIND_FLOAT16 = 2, KIND_CODES = 3 };
/* Each level includes the ones below it (every AVX-512 processor has AVX2). */
enum { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_AVX512_BF16 = 3 };
enum { ERROR_ARGUMENTS = -2, ERROR_ISA = -3, ERROR_MEMORY = -4 }; /* and ERROR_POSITIONS (_encoding.h) */
enum { MAX_VECTORS = 64 };

/* The layout above; the Python side fills one per weight (runtime/kernels.py, ctypes.Structure). */
typedef struct {
    int64_t rows, cols, kept;
    const uint8_t *mask; /* NULL: every entry kept */
    int64_t mask_size;   /* bytes */
    const int64_t *offsets;
    int32_t kind;  /* KIND_*: the stored values' type, or KIND_CODES */
    int32_t round; /* the weight's dtype (KIND_FLOAT32/BFLOAT16/FLOAT16), what codes are rounded to */
    const void *values;
    const uint8_t *codes;
    int64_t codes_size, bits;
    const uint16_t *scales; /* float16, (rows, ngroups) */
    const uint8_t *zeros;   /* (rows, ngroups) */
    int64_t group, ngroups;
} Matrix;

static inline float bfloat16_to_float(uint16_t value) {
    uint32_t bits = (uint32_t)value << 16;
    float result;
    memcpy(&result, &bits, sizeof result);
    return result;
}

static inline float bits_float(uint32_t bits) {
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* A float32 rounded to the weight's dtype and back (exact for float32). */
static inline float rounded(float value, int32_t kind) {
    if (kind == KIND_BFLOAT16) return bfloat16_to_float(float_to_bfloat16(value));
    if (kind == KIND_FLOAT16) return half_to_float(float_to_half(value));
    return value;
}

/* Kept entry k (at `row`, `col`) as a float32. */
static inline float weight_at(const Matrix *w, int64_t k, int64_t row, int64_t col) {
    switch (w->kind) {
    case KIND_FLOAT32: return ((const float *)w->values)[k];
    case KIND_BFLOAT16: return bfloat16_to_float(((const uint16_t *)w->values)[k]);
    case KIND_FLOAT16: return half_to_float(((const uint16_t *)w->values)[k]);
    default: {
        int64_t g = row * w->ngroups + col / w->group;
        float scale = half_to_float(w->scales[g]);
        float code = (float)bits_at(w->codes, w->codes_size, k * w->bits, w->bits);
        return rounded(code * scale - (float)w->zeros[g] * scale, w->round);
    }
    }
}

/* Runs `body` for every kept entry of `row`, left to right, with `col` its column and `k` its index among
 * the stored entries. */
#define FOR_EACH_KEPT(w, row, col, k, body)                                                                 \
    do {                                                                                                   \
        int64_t k = (w)->offsets[row];                                                                     \
        for (int64_t slice_ = 0; slice_ < (w)->cols; slice_ += 32) {                                       \
            int64_t width_ = (w)->cols - slice_ < 32 ? (w)->cols - slice_ : 32;                            \
            uint32_t word_ = (w)->mask ? mask_bits((w)->mask, (w)->mask_size, (row) * (w)->cols + slice_, width_) \
                                       : (uint32_t)((width_ < 32 ? (1ull << width_) : 0x100000000ull) - 1); \
            while (word_) {                                                                                \
                int64_t col = slice_ + __builtin_ctz(word_);                                               \
                word_ &= word_ - 1;                                                                        \
                body;                                                                                      \
                k++;                                                                                       \
            }                                                                                              \
        }                                                                                                  \
    } while (0)

/* --- portable loops ------------------------------------------------------------------------------- */

static void matvec_rows_portable(const Matrix *w, int64_t first, int64_t last, int64_t n, const float *x, float *y) {
    float sums[MAX_VECTORS];
    for (int64_t row = first; row < last; row++) {
        for (int64_t v = 0; v < n; v++) sums[v] = 0.0f;
        FOR_EACH_KEPT(w, row, col, k, {
            float weight = weight_at(w, k, row, col);
            for (int64_t v = 0; v < n; v++) sums[v] += weight * x[v * w->cols + col];
        });
        for (int64_t v = 0; v < n; v++) y[v * w->rows + row] = sums[v];
    }
}

static inline void store(void *out, int64_t index, float value, int32_t out_kind) {
    if (out_kind == KIND_FLOAT32)
        ((float *)out)[index] = value;
    else
        ((uint16_t *)out)[index] = out_kind == KIND_BFLOAT16 ? float_to_bfloat16(value) : float_to_half(value);
}

static void densify_rows_portable(const Matrix *w, int64_t first, int64_t last, int64_t start, int32_t out_kind,
                                  void *out) {
    for (int64_t row = first; row < last; row++) {
        int64_t base = (row - start) * w->cols;
        int64_t width = out_kind == KIND_FLOAT32 ? 4 : 2;
        memset((char *)out + base * width, 0, (size_t)(w->cols * width));
        FOR_EACH_KEPT(w, row, col, k, store(out, base + col, weight_at(w, k, row, col), out_kind));
    }
}

/* --- AVX-512 -------------------------------------------------------------------------------------- */
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx512dq,popcnt,fma,f16c")))
#define AVX2 __attribute__((target("avx2,fma,f16c,popcnt")))

static int isa_available(int32_t isa) {
    __builtin_cpu_init();
    if (isa == ISA_AVX512_BF16)
        return isa_available(ISA_AVX512) && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi");
    if (isa == ISA_AVX512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi2") &&
               __builtin_cpu_supports("avx512dq");
    if (isa == ISA_AVX2)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    return isa == ISA_PORTABLE;
}

/* Rows whose 32-column slices line up with the mask, the quantization groups and 4- or 8-bit codes. */
static int avx512_covers(const Matrix *w) {
    if (w->cols % 32) return 0;
    if (w->kind == KIND_CODES) return (w->bits == 4 || w->bits == 8) && w->group % 32 == 0;
    return 1;
}

AVX512 static inline __m512 round_to_kind512(__m512 value, int32_t kind) {
    if (kind == KIND_BFLOAT16) { /* nearest, ties to even, on the bit pattern (finite values) */
        __m512i bits = _mm512_castps_si512(value);
        __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
        bits = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
        return _mm512_castsi512_ps(_mm512_and_si512(bits, _mm512_set1_epi32((int)0xffff0000u)));
    }
    if (kind == KIND_FLOAT16) return _mm512_cvtph_ps(_mm512_cvtps_ph(value, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return value;
}

/* How far ahead (in entries) to ask for the stored values and the mask: the hardware prefetchers alone
 * left the product waiting on memory. */
#define PREFETCH_VALUES 2048
#define PREFETCH_MASK 4096

/* The mask bits of columns [32j, 32j + 32) of a row (all ones without a mask). */
static inline uint32_t slice_bits(const Matrix *w, int64_t row, int64_t j) {
    uint32_t bits = 0xffffffffu;
    if (w->mask) {
        const uint8_t *where = w->mask + (row * w->cols + 32 * j) / 8;
        if ((j & 15) == 0) __builtin_prefetch(where + PREFETCH_MASK / 8);
        memcpy(&bits, where, sizeof bits);
    }
    return bits;
}

/* The next `count` 16-bit values from `values`, placed at the lanes `bits` marks (zeros elsewhere).
 * A masked load and the register form of expand: the memory form is slow on some processors. */
AVX512 static inline __m512i placed16(const uint16_t *values, uint32_t bits, int count) {
    _mm_prefetch((const char *)(values + PREFETCH_VALUES), _MM_HINT_T0);
    __m512i packed = _mm512_maskz_loadu_epi16((__mmask32)((1ull << count) - 1), values);
    return _mm512_maskz_expand_epi16((__mmask32)bits, packed);
}

/* The `count` codes of a slice's kept entries, from code index k on, one to a 16-bit lane in stored order
 * (not yet placed at their columns; lanes past `count` are garbage). */
AVX512 static inline __m512i packed_codes(const Matrix *w, int64_t k, int count) {
    if (w->bits == 8) {
        _mm_prefetch((const char *)(w->codes + k + PREFETCH_VALUES), _MM_HINT_T0);
        return _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8((__mmask32)((1ull << count) - 1), w->codes + k));
    }
    /* 4 bits: lane i takes nibble i + (k & 1) of the bytes loaded from byte k / 2 (computed, not branched
     * on: at 50% sparsity k's parity is random) */
    _mm_prefetch((const char *)(w->codes + k / 2 + PREFETCH_VALUES / 2), _MM_HINT_T0);
    int odd = (int)(k & 1), bytes = (odd + count + 1) / 2;
    __m512i lanes = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8((__mmask32)((1ull << bytes) - 1), w->codes + k / 2));
    __m512i nibble = _mm512_add_epi16(_mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16,
                                                       15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                      _mm512_set1_epi16((short)odd));
    __m512i shift = _mm512_slli_epi16(_mm512_and_si512(nibble, _mm512_set1_epi16(1)), 2);
    __m512i nibbles = _mm512_srlv_epi16(_mm512_permutexvar_epi16(_mm512_srli_epi16(nibble, 1), lanes), shift);
    return _mm512_and_si512(nibbles, _mm512_set1_epi16(0x0f));
}

/* The quantization group a row's slice is in: its scale and zero point times the scale, broadcast, and
 * for 4-bit codes the 16 weights its codes stand for, rounded to the weight's dtype (16-bit lanes 0-15
 * for bfloat16 and float16 weights, float32 lanes for float32 ones), so that a slice's codes become
 * weights by one table lookup. `end` is the group's last column + 1: a row refreshes it once per group. */
typedef struct {
    __m512 scale, offset;
    __m512i table;
    int64_t end;
} Group512;

AVX512 static inline void enter_group(const Matrix *w, int64_t row, int64_t j, Group512 *group) {
    if (w->kind != KIND_CODES || 32 * j < group->end) return;
    int64_t index = 32 * j / w->group, g = row * w->ngroups + index;
    float scale = half_to_float(w->scales[g]);
    group->scale = _mm512_set1_ps(scale);
    group->offset = _mm512_set1_ps((float)w->zeros[g] * scale);
    group->end = (index + 1) * w->group;
    if (w->bits != 4) return;
    __m512 codes = _mm512_cvtepi32_ps(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
    /* c·s − z·s: both products exact, one rounding, as the reader */
    __m512 weights = round_to_kind512(_mm512_fmsub_ps(codes, group->scale, group->offset), w->round);
    if (w->round == KIND_FLOAT32)
        group->table = _mm512_castps_si512(weights);
    else if (w->round == KIND_BFLOAT16)
        group->table = _mm512_zextsi256_si512(_mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(weights), 16)));
    else
        group->table = _mm512_zextsi256_si512(_mm512_cvtps_ph(weights, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

/* A slice's codes as weights of the weight's 16-bit dtype, placed at their columns (zeros elsewhere). */
AVX512 static inline __m512i placed_weights16(const Matrix *w, int64_t k, uint32_t bits, int count,
                                              const Group512 *group) {
    __m512i codes = packed_codes(w, k, count);
    if (w->bits == 4) { /* without a mask the codes are in column order already */
        __m512i weights = _mm512_permutexvar_epi16(codes, group->table);
        return w->mask ? _mm512_maskz_expand_epi16((__mmask32)bits, weights) : weights;
    }
    __m512i placed = _mm512_maskz_expand_epi16((__mmask32)bits, codes);
    __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(placed)));
    __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(placed, 1)));
    low = _mm512_maskz_mov_ps((__mmask16)bits, _mm512_fmsub_ps(low, group->scale, group->offset));
    high = _mm512_maskz_mov_ps((__mmask16)(bits >> 16), _mm512_fmsub_ps(high, group->scale, group->offset));
    if (w->round == KIND_FLOAT16)
        return _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtps_ph(low, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)),
                                  _mm512_cvtps_ph(high, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), 1);
    __m512i first = _mm512_srli_epi32(_mm512_castps_si512(round_to_kind512(low, KIND_BFLOAT16)), 16);
    __m512i second = _mm512_srli_epi32(_mm512_castps_si512(round_to_kind512(high, KIND_BFLOAT16)), 16);
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(first)), _mm512_cvtepi32_epi16(second), 1);
}

/* 32 16-bit weights (bfloat16 or float16 bit patterns) as two float32 vectors. */
AVX512 static inline void widen512(__m512i placed, int32_t kind, __m512 *low, __m512 *high) {
    __m256i first = _mm512_castsi512_si256(placed), second = _mm512_extracti64x4_epi64(placed, 1);
    if (kind == KIND_BFLOAT16) {
        *low = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(first), 16));
        *high = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(second), 16));
    } else {
        *low = _mm512_cvtph_ps(first);
        *high = _mm512_cvtph_ps(second);
    }
}

/* The 32 weights of columns [32j, 32j + 32) of a row as two float32 vectors (zeros where not kept),
 * advancing `k`, the index of the row's next kept entry. */
AVX512 static inline void slice512(const Matrix *w, int64_t row, int64_t j, int64_t *k, Group512 *group, __m512 *low,
                                   __m512 *high) {
    uint32_t bits = slice_bits(w, row, j);
    int count = __builtin_popcount(bits);
    if (w->kind == KIND_FLOAT32) {
        const float *values = (const float *)w->values + *k;
        _mm_prefetch((const char *)(values + PREFETCH_VALUES), _MM_HINT_T0);
        int first = __builtin_popcount(bits & 0xffff);
        *low = _mm512_maskz_expand_ps((__mmask16)bits, _mm512_maskz_loadu_ps((__mmask16)((1u << first) - 1), values));
        *high = _mm512_maskz_expand_ps((__mmask16)(bits >> 16),
                                       _mm512_maskz_loadu_ps((__mmask16)((1u << (count - first)) - 1), values + first));
    } else if (w->kind != KIND_CODES) {
        widen512(placed16((const uint16_t *)w->values + *k, bits, count), w->kind, low, high);
    } else {
        enter_group(w, row, j, group);
        if (w->round != KIND_FLOAT32) {
            widen512(placed_weights16(w, *k, bits, count, group), w->round, low, high);
        } else { /* float32 weights: codes placed, then looked up (4 bits) or dequantized (8 bits) */
            __m512i placed = _mm512_maskz_expand_epi16((__mmask32)bits, packed_codes(w, *k, count));
            __m512i first = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(placed));
            __m512i second = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(placed, 1));
            if (w->bits == 4) {
                *low = _mm512_permutexvar_ps(first, _mm512_castsi512_ps(group->table));
                *high = _mm512_permutexvar_ps(second, _mm512_castsi512_ps(group->table));
            } else {
                *low = _mm512_fmsub_ps(_mm512_cvtepi32_ps(first), group->scale, group->offset);
                *high = _mm512_fmsub_ps(_mm512_cvtepi32_ps(second), group->scale, group->offset);
            }
            *low = _mm512_maskz_mov_ps((__mmask16)bits, *low); /* +0.0 where not kept */
            *high = _mm512_maskz_mov_ps((__mmask16)(bits >> 16), *high);
        }
    }
    *k += count;
}

/* One row against `count` (1 to 4, a constant once inlined: the sums stay in registers) float32 vectors. */
AVX512 static inline __attribute__((always_inline)) void row_avx512(const Matrix *w, int64_t row, const float *x,
                                                                    float *y, const int count) {
    __m512 sums[4][2];
    for (int v = 0; v < count; v++) sums[v][0] = sums[v][1] = _mm512_setzero_ps();
    int64_t k = w->offsets[row];
    Group512 group = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_si512(), 0};
    for (int64_t j = 0; j < w->cols / 32; j++) {
        __m512 low, high;
        slice512(w, row, j, &k, &group, &low, &high);
        for (int v = 0; v < count; v++) {
            const float *input = x + v * w->cols + 32 * j;
            sums[v][0] = _mm512_fmadd_ps(low, _mm512_loadu_ps(input), sums[v][0]);
            sums[v][1] = _mm512_fmadd_ps(high, _mm512_loadu_ps(input + 16), sums[v][1]);
        }
    }
    for (int v = 0; v < count; v++) y[v * w->rows + row] = _mm512_reduce_add_ps(_mm512_add_ps(sums[v][0], sums[v][1]));
}

/* Rows [first, last) of the weight against n vectors, four at a time: `row_function(w, row, x, y, count)`
 * gets count as a constant 1-4, so that once inlined its sums stay in registers. */
#define ROWS_BY_FOUR_VECTORS(row_function, w, first, last, n, x, y)                                           \
    for (int64_t row_ = (first); row_ < (last); row_++)                                                      \
        for (int64_t v_ = 0; v_ < (n); v_ += 4) {                                                            \
            switch ((n) - v_ < 4 ? (n) - v_ : 4) {                                                           \
            case 1: row_function((w), row_, (x) + v_ * (w)->cols, (y) + v_ * (w)->rows, 1); break;            \
            case 2: row_function((w), row_, (x) + v_ * (w)->cols, (y) + v_ * (w)->rows, 2); break;            \
            case 3: row_function((w), row_, (x) + v_ * (w)->cols, (y) + v_ * (w)->rows, 3); break;            \
            default: row_function((w), row_, (x) + v_ * (w)->cols, (y) + v_ * (w)->rows, 4);                  \
            }                                                                                                \
        }

AVX512 static void matvec_rows_avx512(const Matrix *w, int64_t first, int64_t last, int64_t n, const float *x,
                                      float *y) {
    ROWS_BY_FOUR_VECTORS(row_avx512, w, first, last, n, x, y);
}

/* bfloat16 inputs against weights that are bfloat16 (stored, or codes rounded to it): AVX512_BF16's dot
 * product of pairs, exact products summed in float32, with no conversion of either side. */
#define AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,avx512dq,avx512bf16,popcnt,fma,f16c")))

static int bf16_covers(const Matrix *w) {
    return avx512_covers(w) && (w->kind == KIND_BFLOAT16 || (w->kind == KIND_CODES && w->round == KIND_BFLOAT16));
}

AVX512BF16 static inline __m512bh slice_bf16(const Matrix *w, int64_t row, int64_t j, int64_t *k, Group512 *group) {
    uint32_t bits = slice_bits(w, row, j);
    int count = __builtin_popcount(bits);
    __m512i placed;
    if (w->kind == KIND_BFLOAT16) {
        placed = placed16((const uint16_t *)w->values + *k, bits, count);
    } else {
        enter_group(w, row, j, group);
        placed = placed_weights16(w, *k, bits, count, group);
    }
    *k += count;
    return (__m512bh)placed;
}

AVX512BF16 static inline __attribute__((always_inline)) void row_bf16(const Matrix *w, int64_t row, const uint16_t *x,
                                                                      float *y, const int count) {
    __m512 sums[4][2];
    for (int v = 0; v < count; v++) sums[v][0] = sums[v][1] = _mm512_setzero_ps();
    int64_t k = w->offsets[row], slices = w->cols / 32, j = 0;
    Group512 group = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_si512(), 0};
    for (; j + 1 < slices; j += 2) { /* two slices, two sums per vector: the dot products' latency hidden */
        __m512bh even = slice_bf16(w, row, j, &k, &group), odd = slice_bf16(w, row, j + 1, &k, &group);
        for (int v = 0; v < count; v++) {
            const uint16_t *input = x + v * w->cols + 32 * j;
            sums[v][0] = _mm512_dpbf16_ps(sums[v][0], even, (__m512bh)_mm512_loadu_si512(input));
            sums[v][1] = _mm512_dpbf16_ps(sums[v][1], odd, (__m512bh)_mm512_loadu_si512(input + 32));
        }
    }
    if (j < slices) {
        __m512bh last = slice_bf16(w, row, j, &k, &group);
        for (int v = 0; v < count; v++)
            sums[v][0] = _mm512_dpbf16_ps(sums[v][0], last, (__m512bh)_mm512_loadu_si512(x + v * w->cols + 32 * j));
    }
    for (int v = 0; v < count; v++) y[v * w->rows + row] = _mm512_reduce_add_ps(_mm512_add_ps(sums[v][0], sums[v][1]));
}

/* 4-bit codes rounded to bfloat16, 64 columns at a time in byte lanes (VBMI's byte permutes): the codes
 * of 64 columns are unpacked, placed and looked up once where the 32-column path does it twice, about half
 * the instructions per weight. The table lookup yields the weights' low and high bytes, which the byte
 * unpacks interleave within 128-bit lanes: weights of columns 16L..16L+7 of each lane L land in the first
 * register and 16L+8..16L+15 in the second, so the inputs are permuted the same way once per call
 * (`permute_inputs64`). Covers codes of 4 bits, bfloat16 weights, 64 | cols and 64 | group. */
static int codes64_covers(const Matrix *w) {
    return w->kind == KIND_CODES && w->bits == 4 && w->round == KIND_BFLOAT16 && w->cols % 64 == 0 &&
           w->group % 64 == 0;
}

/* x (n, cols) bfloat16 → the order the 64-column path's weights come in (see above). */
static void permute_inputs64(const uint16_t *x, int64_t n, int64_t cols, uint16_t *out) {
    for (int64_t v = 0; v < n; v++)
        for (int64_t chunk = 0; chunk < cols; chunk += 64)
            for (int64_t lane = 0; lane < 4; lane++)
                for (int64_t i = 0; i < 8; i++) {
                    const uint16_t *source = x + v * cols + chunk + 16 * lane;
                    uint16_t *target = out + v * cols + chunk;
                    target[8 * lane + i] = source[i];
                    target[32 + 8 * lane + i] = source[8 + i];
                }
}

/* The bfloat16 weights a group's 16 codes stand for, in 16-bit lanes 0-15: (c − z)·s = c·s − z·s is exact
 * in float32 (a float16 scale times an integer below 2^8), and VCVTNEPS2BF16 rounds it to nearest even, as
 * the reader does. `scale` and `offset` (z·s) are read as broadcasts from memory: no shuffles (a
 * table is built for every 128 or so columns of every row, so its cost weighs like the products'). */
AVX512BF16 static inline __m512i group_table_bf16(const float *scale, const float *offset) {
    const __m512 codes = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m512 weights = _mm512_fmsub_ps(codes, _mm512_set1_ps(*scale), _mm512_set1_ps(*offset));
    return _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(weights)); /* lanes 16-31 are never indexed */
}

/* A row's scales and offsets (z·s) of groups [first, first + count) as float32, count <= 16. */
AVX512BF16 static inline void group_floats(const Matrix *w, int64_t row, int64_t first, int count, float *scale,
                                           float *offset) {
    __mmask16 lanes = (__mmask16)((1u << count) - 1);
    int64_t g = row * w->ngroups + first;
    __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, w->scales + g));
    __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lanes, w->zeros + g)));
    _mm512_storeu_ps(scale, s);
    _mm512_storeu_ps(offset, _mm512_mul_ps(z, s));
}

AVX512BF16 static inline __attribute__((always_inline)) void row_codes64(const Matrix *w, int64_t row,
                                                                         const uint16_t *x, float *y,
                                                                         const int count) {
    /* output byte b of qword q holds nibble 8q + b (+1 when the codes start odd): its qword gathers
     * source bytes 4q..4q+7, and a multishift takes the 8 bits from 4·(b + odd) − 1 on, so that the code
     * lands doubled, as the byte index of its weight's low byte in the group's table (the shifts for an
     * odd start are loaded, not broadcast: a broadcast from a general register costs two shuffles) */
    const __m512i spread = _mm512_set_epi8(35, 34, 33, 32, 31, 30, 29, 28, 31, 30, 29, 28, 27, 26, 25, 24, 27, 26, 25,
                                           24, 23, 22, 21, 20, 23, 22, 21, 20, 19, 18, 17, 16, 19, 18, 17, 16, 15, 14,
                                           13, 12, 15, 14, 13, 12, 11, 10, 9, 8, 11, 10, 9, 8, 7, 6, 5, 4, 7, 6, 5, 4, 3,
                                           2, 1, 0);
    const __m512i even = _mm512_set1_epi64(0x1b17130f0b0703ffll);
    const __m512i shifts[2] = {even, _mm512_add_epi8(even, _mm512_set1_epi8(4))};
    __m512 sums[4][2];
    for (int v = 0; v < count; v++) sums[v][0] = sums[v][1] = _mm512_setzero_ps();
    int64_t k = w->offsets[row];
    float scale[16], offset[16];
    for (int64_t g = 0; g < w->ngroups; g++) {
        if ((g & 15) == 0) group_floats(w, row, g, w->ngroups - g < 16 ? (int)(w->ngroups - g) : 16, scale, offset);
        __m512i table = group_table_bf16(scale + (g & 15), offset + (g & 15));
        int64_t chunk = g * w->group, chunks = ((g + 1) * w->group < w->cols ? w->group : w->cols - chunk) / 64;
        for (int64_t c = 0; c < chunks; c++, chunk += 64) {
            uint64_t bits = ~0ull;
            if (w->mask) memcpy(&bits, w->mask + (row * w->cols + chunk) / 8, sizeof bits);
            int kept = __builtin_popcountll(bits), odd = (int)(k & 1), bytes = (odd + kept + 1) / 2;
            const uint8_t *codes = w->codes + k / 2;
            _mm_prefetch((const char *)(codes + PREFETCH_VALUES / 2), _MM_HINT_T0);
            /* a whole register where the codes run on for 64 bytes more (all but a row's last chunks) */
            __m512i source = k / 2 + 64 <= w->codes_size ? _mm512_loadu_si512(codes)
                                                         : _mm512_maskz_loadu_epi8((1ull << bytes) - 1, codes);
            __m512i low_index = _mm512_and_si512(
                _mm512_multishift_epi64_epi8(shifts[odd], _mm512_permutexvar_epi8(spread, source)), _mm512_set1_epi8(0x1e));
            if (w->mask) low_index = _mm512_maskz_expand_epi8((__mmask64)bits, low_index);
            __m512i high_index = _mm512_or_si512(low_index, _mm512_set1_epi8(1));
            __m512i low = _mm512_maskz_permutexvar_epi8((__mmask64)bits, low_index, table);
            __m512i high = _mm512_maskz_permutexvar_epi8((__mmask64)bits, high_index, table);
            __m512bh first = (__m512bh)_mm512_unpacklo_epi8(low, high), second = (__m512bh)_mm512_unpackhi_epi8(low, high);
            for (int v = 0; v < count; v++) {
                const uint16_t *input = x + v * w->cols + chunk;
                sums[v][0] = _mm512_dpbf16_ps(sums[v][0], first, (__m512bh)_mm512_loadu_si512(input));
                sums[v][1] = _mm512_dpbf16_ps(sums[v][1], second, (__m512bh)_mm512_loadu_si512(input + 32));
            }
            k += kept;
        }
    }
    for (int v = 0; v < count; v++) y[v * w->rows + row] = _mm512_reduce_add_ps(_mm512_add_ps(sums[v][0], sums[v][1]));
}

AVX512BF16 static void matvec_rows_bf16(const Matrix *w, int64_t first, int64_t last, int64_t n, const uint16_t *x,
                                        float *y) {
    if (codes64_covers(w)) { /* x is then in the permuted order */
        ROWS_BY_FOUR_VECTORS(row_codes64, w, first, last, n, x, y);
    } else {
        ROWS_BY_FOUR_VECTORS(row_bf16, w, first, last, n, x, y);
    }
}

AVX512 static void densify_rows_avx512(const Matrix *w, int64_t first, int64_t last, int64_t start, int32_t out_kind,
                                       void *out) {
    int64_t slices = w->cols / 32;
    /* weights already of the output's 16-bit kind are stored as they are placed, without a float32 detour */
    int native16 = out_kind != KIND_FLOAT32 &&
                   (w->kind == out_kind || (w->kind == KIND_CODES && w->round == out_kind));
    for (int64_t row = first; row < last; row++) {
        int64_t k = w->offsets[row], base = (row - start) * w->cols;
        Group512 group = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_si512(), 0};
        for (int64_t j = 0; j < slices; j++) {
            if (native16) {
                uint32_t bits = slice_bits(w, row, j);
                int count = __builtin_popcount(bits);
                __m512i placed;
                if (w->kind == KIND_CODES) {
                    enter_group(w, row, j, &group);
                    placed = placed_weights16(w, k, bits, count, &group);
                } else {
                    placed = placed16((const uint16_t *)w->values + k, bits, count);
                }
                k += count;
                _mm512_storeu_si512((uint16_t *)out + base + 32 * j, placed);
                continue;
            }
            __m512 low, high;
            slice512(w, row, j, &k, &group, &low, &high);
            if (out_kind == KIND_FLOAT32) {
                _mm512_storeu_ps((float *)out + base + 32 * j, low);
                _mm512_storeu_ps((float *)out + base + 32 * j + 16, high);
            } else if (out_kind == KIND_FLOAT16) {
                uint16_t *target = (uint16_t *)out + base + 32 * j;
                _mm256_storeu_si256((__m256i *)target, _mm512_cvtps_ph(low, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
                _mm256_storeu_si256((__m256i *)(target + 16),
                                    _mm512_cvtps_ph(high, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            } else {
                low = round_to_kind512(low, KIND_BFLOAT16);
                high = round_to_kind512(high, KIND_BFLOAT16);
                __m512i both = _mm512_packus_epi32(_mm512_srli_epi32(_mm512_castps_si512(low), 16),
                                                   _mm512_srli_epi32(_mm512_castps_si512(high), 16));
                /* packus interleaves 128-bit lanes: put the 16-bit words back in column order */
                both = _mm512_permutexvar_epi64(_mm512_set_epi64(7, 5, 3, 1, 6, 4, 2, 0), both);
                _mm512_storeu_si512((uint16_t *)out + base + 32 * j, both);
            }
        }
    }
}

/* --- AVX2 ----------------------------------------------------------------------------------------- */

/* For mask byte b and each of its 8 lanes: expand_index, how many kept columns precede the lane;
 * kept_lanes, all ones where the lane is kept. */
static int32_t expand_index[256][8], kept_lanes[256][8];

__attribute__((constructor)) static void fill_expand_index(void) {
    for (int b = 0; b < 256; b++)
        for (int lane = 0, before = 0; lane < 8; lane++) {
            expand_index[b][lane] = before;
            kept_lanes[b][lane] = (b >> lane) & 1 ? -1 : 0;
            before += (b >> lane) & 1;
        }
}

/* Rows of 8-column slices; codes of at most 4 bits or of 8, in groups that 8-column slices do not straddle. */
static int avx2_covers(const Matrix *w) {
    if (w->cols % 8) return 0;
    return w->kind != KIND_CODES || ((w->bits <= 4 || w->bits == 8) && w->group % 8 == 0);
}

/* The 8 weights of columns [8j, 8j + 8) of a row (zeros where not kept), advancing k. Reads 8 stored values
 * from k, so the caller keeps k + 8 within the stored values. */
AVX2 static inline __m256 slice256(const Matrix *w, int64_t row, int64_t j, int64_t *k) {
    int bits = w->mask ? w->mask[(row * w->cols) / 8 + j] : 0xff;
    _mm_prefetch((const char *)w->values + (*k + PREFETCH_VALUES) * (w->kind == KIND_FLOAT32 ? 4 : 2), _MM_HINT_T0);
    if (w->mask && (j & 63) == 0) _mm_prefetch((const char *)w->mask + (row * w->cols) / 8 + j + PREFETCH_MASK / 8, _MM_HINT_T0);
    __m256 loaded;
    if (w->kind == KIND_FLOAT32)
        loaded = _mm256_loadu_ps((const float *)w->values + *k);
    else {
        __m128i raw = _mm_loadu_si128((const __m128i *)((const uint16_t *)w->values + *k));
        loaded = w->kind == KIND_FLOAT16 ? _mm256_cvtph_ps(raw)
                                         : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
    }
    __m256i index = _mm256_loadu_si256((const __m256i *)expand_index[bits]);
    __m256i lane_bits = _mm256_set_epi32(128, 64, 32, 16, 8, 4, 2, 1);
    __m256i kept = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bits), lane_bits), lane_bits);
    *k += __builtin_popcount((unsigned)bits);
    return _mm256_and_ps(_mm256_permutevar8x32_ps(loaded, index), _mm256_castsi256_ps(kept));
}

/* --- codes, 8 columns at a time: a row's walk through its code stream and its groups --- */

/* Where a row's walk is: `bit`, the stream position of its next kept code; for the current group, the
 * weights of codes 0-7 and 8-15 (`low`, `high`, a table read by in-register permutes) where codes have up
 * to 4 bits, or the scale and the offset z·s in every lane for 8-bit codes; `shifts` and `code_bits`
 * unpack a slice's codes. */
typedef struct {
    __m256 low, high, scale, offset;
    __m256i shifts, code_bits;
    int64_t bit;
} Codes256;

AVX2 static inline __attribute__((always_inline)) Codes256 codes_walk256(const Matrix *w, int64_t row) {
    int b = (int)w->bits;
    Codes256 walk;
    walk.low = walk.high = walk.scale = walk.offset = _mm256_setzero_ps();
    walk.shifts = _mm256_set_epi32(7 * b, 6 * b, 5 * b, 4 * b, 3 * b, 2 * b, b, 0);
    walk.code_bits = _mm256_set1_epi32((1 << b) - 1);
    walk.bit = w->offsets[row] * w->bits;
    return walk;
}

/* (q − z)·s for 8 codes q (as float32), rounded to the weight's dtype as the reader rounds it: q·s and
 * z·s are exact in float32 (a float16 scale times an integer below 2^8), so the fused subtraction rounds
 * once, as the reader's float32 arithmetic does. */
AVX2 static inline __attribute__((always_inline)) __m256 dequantized256(const Matrix *w, __m256 codes, __m256 scale,
                                                                        __m256 offset) {
    __m256 value = _mm256_fmsub_ps(codes, scale, offset);
    if (w->round == KIND_BFLOAT16) { /* nearest, ties to even, on the bit pattern (finite values) */
        __m256i bits = _mm256_castps_si256(value);
        __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
        bits = _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
        return _mm256_castsi256_ps(_mm256_and_si256(bits, _mm256_set1_epi32((int)0xffff0000u)));
    }
    if (w->round == KIND_FLOAT16) return _mm256_cvtph_ps(_mm256_cvtps_ph(value, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return value;
}

/* Group g (its index among the row-major scales) becomes the walk's current one. */
AVX2 static inline __attribute__((always_inline)) void enter_group256(const Matrix *w, int64_t g, Codes256 *walk) {
    float scale = _cvtsh_ss(w->scales[g]);
    walk->scale = _mm256_set1_ps(scale);
    walk->offset = _mm256_set1_ps((float)w->zeros[g] * scale);
    if (w->bits <= 4) {
        __m256 codes = _mm256_set_ps(7, 6, 5, 4, 3, 2, 1, 0);
        walk->low = dequantized256(w, codes, walk->scale, walk->offset);
        walk->high = dequantized256(w, _mm256_add_ps(codes, _mm256_set1_ps(8)), walk->scale, walk->offset);
    }
}

/* The weights of the next 8 columns, whose mask byte is `bits` (zeros where not kept), advancing the walk.
 * The 8 bytes from the first code's byte, shifted to its bit, hold the next eight codes (8·bits + 7 <= 64
 * for bits <= 4; 8-bit codes start on a byte); near the stream's end the bytes past it read as 0. */
AVX2 static inline __attribute__((always_inline)) __m256 codes_slice256(const Matrix *w, int bits, Codes256 *walk) {
    int64_t byte = walk->bit >> 3;
    uint64_t word = 0;
    if (byte + 8 <= w->codes_size)
        memcpy(&word, w->codes + byte, 8); /* one load */
    else if (byte < w->codes_size)
        memcpy(&word, w->codes + byte, (size_t)(w->codes_size - byte));
    word >>= walk->bit & 7;
    walk->bit += __builtin_popcount((unsigned)bits) * w->bits;
    __m256 weights;
    if (w->bits == 8) {
        __m256i codes = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)word));
        weights = dequantized256(w, _mm256_cvtepi32_ps(codes), walk->scale, walk->offset);
    } else {
        __m256i codes = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)(uint32_t)word), walk->shifts),
                                         walk->code_bits);
        /* two 8-entry lookups (a permute reads the index's low 3 bits), chosen by the code's bit 3 */
        __m256 low = _mm256_permutevar8x32_ps(walk->low, codes), high = _mm256_permutevar8x32_ps(walk->high, codes);
        weights = _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)));
    }
    if (bits == 0xff) return weights;
    __m256i index = _mm256_loadu_si256((const __m256i *)expand_index[bits]);
    __m256 kept = _mm256_loadu_ps((const float *)kept_lanes[bits]);
    return _mm256_and_ps(_mm256_permutevar8x32_ps(weights, index), kept);
}

/* Runs `body` for every 8-column slice of a row of codes, left to right, with `weights` its weights and
 * `j` its index, the walk entering each group where it starts. */
#define FOR_EACH_CODES_SLICE256(w, row, j, weights, body)                                                  \
    do {                                                                                                   \
        Codes256 walk_ = codes_walk256((w), (row));                                                        \
        const uint8_t *mask_ = (w)->mask ? (w)->mask + (row) * (w)->cols / 8 : NULL;                       \
        for (int64_t g_ = 0; g_ < (w)->ngroups; g_++) {                                                    \
            enter_group256((w), (row) * (w)->ngroups + g_, &walk_);                                        \
            int64_t end_ = (g_ + 1) * (w)->group < (w)->cols ? (g_ + 1) * (w)->group : (w)->cols;          \
            for (int64_t j = g_ * (w)->group / 8; j < end_ / 8; j++) {                                     \
                if (mask_ && (j & 63) == 0) _mm_prefetch((const char *)mask_ + j + PREFETCH_MASK / 8, _MM_HINT_T0); \
                _mm_prefetch((const char *)(w)->codes + (walk_.bit >> 3) + PREFETCH_VALUES / 2, _MM_HINT_T0); \
                __m256 weights = codes_slice256((w), mask_ ? mask_[j] : 0xff, &walk_);                     \
                body;                                                                                      \
            }                                                                                              \
        }                                                                                                  \
    } while (0)

AVX2 static inline __attribute__((always_inline)) void row_codes_avx2(const Matrix *w, int64_t row, const float *x,
                                                                      float *y, const int count) {
    __m256 sums[4];
    for (int v = 0; v < count; v++) sums[v] = _mm256_setzero_ps();
    FOR_EACH_CODES_SLICE256(w, row, j, weights, {
        for (int v = 0; v < count; v++) sums[v] = _mm256_fmadd_ps(weights, _mm256_loadu_ps(x + v * w->cols + 8 * j), sums[v]);
    });
    for (int v = 0; v < count; v++) {
        __m128 half = _mm_add_ps(_mm256_castps256_ps128(sums[v]), _mm256_extractf128_ps(sums[v], 1));
        half = _mm_add_ps(half, _mm_movehl_ps(half, half));
        half = _mm_add_ss(half, _mm_movehdup_ps(half));
        y[v * w->rows + row] = _mm_cvtss_f32(half);
    }
}

/* Whether a row's 8-value reads stay inside the stored values (the last rows may not). */
static inline int avx2_row_fits(const Matrix *w, int64_t row) {
    return w->kind == KIND_CODES || w->offsets[row + 1] + 8 <= w->kept;
}

/* One row against `count` float32 vectors (a constant once inlined, as row_avx512); rows whose 8-value
 * reads would pass the stored values take the portable loop. */
AVX2 static inline __attribute__((always_inline)) void row_avx2(const Matrix *w, int64_t row, const float *x, float *y,
                                                                const int count) {
    if (!avx2_row_fits(w, row)) {
        matvec_rows_portable(w, row, row + 1, count, x, y);
        return;
    }
    __m256 sums[4][2];
    for (int v = 0; v < count; v++) sums[v][0] = sums[v][1] = _mm256_setzero_ps();
    int64_t k = w->offsets[row], slices = w->cols / 8, j = 0;
    for (; j + 1 < slices; j += 2) { /* two slices, two sums per vector */
        __m256 even = slice256(w, row, j, &k), odd = slice256(w, row, j + 1, &k);
        for (int v = 0; v < count; v++) {
            const float *input = x + v * w->cols + 8 * j;
            sums[v][0] = _mm256_fmadd_ps(even, _mm256_loadu_ps(input), sums[v][0]);
            sums[v][1] = _mm256_fmadd_ps(odd, _mm256_loadu_ps(input + 8), sums[v][1]);
        }
    }
    if (j < slices) {
        __m256 last = slice256(w, row, j, &k);
        for (int v = 0; v < count; v++)
            sums[v][0] = _mm256_fmadd_ps(last, _mm256_loadu_ps(x + v * w->cols + 8 * j), sums[v][0]);
    }
    for (int v = 0; v < count; v++) {
        __m256 sum = _mm256_add_ps(sums[v][0], sums[v][1]);
        __m128 half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
        half = _mm_add_ps(half, _mm_movehl_ps(half, half));
        half = _mm_add_ss(half, _mm_movehdup_ps(half));
        y[v * w->rows + row] = _mm_cvtss_f32(half);
    }
}

AVX2 static void matvec_rows_avx2(const Matrix *w, int64_t first, int64_t last, int64_t n, const float *x, float *y) {
    if (w->kind == KIND_CODES) {
        ROWS_BY_FOUR_VECTORS(row_codes_avx2, w, first, last, n, x, y);
    } else {
        ROWS_BY_FOUR_VECTORS(row_avx2, w, first, last, n, x, y);
    }
}

/* 8 float32 weights that are bfloat16 values, as those bfloat16 values: their upper halves, exactly. */
AVX2 static inline __m128i upper_halves256(__m256 weights) {
    __m256i upper = _mm256_srli_epi32(_mm256_castps_si256(weights), 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(upper), _mm256_extracti128_si256(upper, 1));
}

AVX2 static void densify_rows_avx2(const Matrix *w, int64_t first, int64_t last, int64_t start, int32_t out_kind,
                                   void *out) {
    int64_t slices = w->cols / 8;
    int32_t values = w->kind == KIND_CODES ? w->round : w->kind; /* the dtype the weights decode to */
    /* a 16-bit output only of the weights' own dtype (float16 only from codes), which holds them exactly */
    int exact = out_kind == KIND_FLOAT32 || (out_kind == values && (out_kind == KIND_BFLOAT16 || w->kind == KIND_CODES));
    for (int64_t row = first; row < last; row++) {
        if (!exact || !avx2_row_fits(w, row)) {
            densify_rows_portable(w, row, row + 1, start, out_kind, out);
            continue;
        }
        int64_t base = (row - start) * w->cols;
        if (w->kind == KIND_CODES) {
            FOR_EACH_CODES_SLICE256(w, row, j, weights, {
                if (out_kind == KIND_FLOAT32)
                    _mm256_storeu_ps((float *)out + base + 8 * j, weights);
                else if (out_kind == KIND_FLOAT16)
                    _mm_storeu_si128((__m128i *)((uint16_t *)out + base + 8 * j),
                                     _mm256_cvtps_ph(weights, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
                else
                    _mm_storeu_si128((__m128i *)((uint16_t *)out + base + 8 * j), upper_halves256(weights));
            });
            continue;
        }
        int64_t k = w->offsets[row];
        for (int64_t j = 0; j < slices; j++) {
            __m256 weights = slice256(w, row, j, &k);
            if (out_kind == KIND_FLOAT32)
                _mm256_storeu_ps((float *)out + base + 8 * j, weights);
            else
                _mm_storeu_si128((__m128i *)((uint16_t *)out + base + 8 * j), upper_halves256(weights));
        }
    }
}
#else
static int isa_available(int32_t isa) { return isa == ISA_PORTABLE; }
static int avx512_covers(const Matrix *w) { (void)w; return 0; }
static int bf16_covers(const Matrix *w) { (void)w; return 0; }
static int avx2_covers(const Matrix *w) { (void)w; return 0; }
#endif

/* --- entry points --------------------------------------------------------------------------------- */

/* The fastest instruction set this processor runs. */
int32_t sgpt_best_isa(void) {
    if (isa_available(ISA_AVX512_BF16)) return ISA_AVX512_BF16;
    if (isa_available(ISA_AVX512)) return ISA_AVX512;
    if (isa_available(ISA_AVX2)) return ISA_AVX2;
    return ISA_PORTABLE;
}

static int64_t check(const Matrix *w, int32_t isa) {
    if (w->rows < 0 || w->cols <= 0 || w->offsets == NULL || w->kind < 0 || w->kind > KIND_CODES) return ERROR_ARGUMENTS;
    if (w->kind == KIND_CODES && (w->bits < 1 || w->bits > 8 || w->group <= 0 || w->ngroups != (w->cols + w->group - 1) / w->group))
        return ERROR_ARGUMENTS;
    if (!isa_available(isa)) return ERROR_ISA;
    return 0;
}

/* Whether sgpt_matvec takes bfloat16 inputs for this weight with instruction set `isa` (else float32). */
int32_t sgpt_takes_bfloat16(const Matrix *w, int32_t isa) {
    return isa >= ISA_AVX512_BF16 && isa_available(ISA_AVX512_BF16) && bf16_covers(w);
}

/* y (n, rows) = x (n, cols) · Ŵᵀ, n <= MAX_VECTORS, with instruction set `isa` where it covers the
 * weight's shape and encoding (the next level down elsewhere, down to the portable loop). x is float32,
 * or bfloat16 (`x_kind` KIND_BFLOAT16) where sgpt_takes_bfloat16 says so. 0, or a negative error. */
int64_t sgpt_matvec(const Matrix *w, int64_t n, const void *x, int32_t x_kind, float *y, int32_t isa,
                    int32_t threads) {
    int64_t status = check(w, isa);
    if (status) return status;
    if (n < 0 || n > MAX_VECTORS || (x_kind != KIND_FLOAT32 && x_kind != KIND_BFLOAT16)) return ERROR_ARGUMENTS;
    if (x_kind == KIND_BFLOAT16 && !sgpt_takes_bfloat16(w, isa)) return ERROR_ARGUMENTS;
    if (isa == ISA_AVX512_BF16 && x_kind == KIND_FLOAT32) isa = ISA_AVX512;
    if (isa == ISA_AVX512 && !avx512_covers(w)) isa = ISA_AVX2;
    if (isa == ISA_AVX2 && !avx2_covers(w)) isa = ISA_PORTABLE;
    uint16_t *permuted = NULL;
#if defined(__GNUC__) && defined(__x86_64__)
    if (isa == ISA_AVX512_BF16 && codes64_covers(w)) {
        permuted = malloc((size_t)(n * w->cols) * sizeof *permuted);
        if (permuted == NULL) return ERROR_MEMORY;
        permute_inputs64((const uint16_t *)x, n, w->cols, permuted);
        x = permuted;
    }
#endif
    int64_t block = 16, blocks = (w->rows + block - 1) / block;
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t first = b * block, last = first + block < w->rows ? first + block : w->rows;
#if defined(__GNUC__) && defined(__x86_64__)
        if (isa == ISA_AVX512_BF16) {
            matvec_rows_bf16(w, first, last, n, (const uint16_t *)x, y);
            continue;
        }
        if (isa == ISA_AVX512) {
            matvec_rows_avx512(w, first, last, n, (const float *)x, y);
            continue;
        }
        if (isa == ISA_AVX2) {
            matvec_rows_avx2(w, first, last, n, (const float *)x, y);
            continue;
        }
#endif
        matvec_rows_portable(w, first, last, n, (const float *)x, y);
    }
    free(permuted);
    return 0;
}

/* Rows [first, last) of Ŵ, densely and row-major, into `out` of kind `out_kind` (KIND_FLOAT32/BFLOAT16/
 * FLOAT16; the weights' values rounded to it, exact when it is their dtype or float32). */
int64_t sgpt_densify(const Matrix *w, int64_t first, int64_t last, int32_t out_kind, void *out, int32_t isa,
                     int32_t threads) {
    int64_t status = check(w, isa);
    if (status) return status;
    if (first < 0 || last > w->rows || first > last || out_kind < 0 || out_kind > KIND_FLOAT16) return ERROR_ARGUMENTS;
    if (isa == ISA_AVX512_BF16) isa = ISA_AVX512;
    if (isa == ISA_AVX512 && !avx512_covers(w)) isa = ISA_AVX2;
    if (isa == ISA_AVX2 && !avx2_covers(w)) isa = ISA_PORTABLE;
    int64_t block = 16, blocks = (last - first + block - 1) / block;
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t begin = first + b * block, end = begin + block < last ? begin + block : last;
#if defined(__GNUC__) && defined(__x86_64__)
        if (isa == ISA_AVX512) {
            densify_rows_avx512(w, begin, end, first, out_kind, out);
            continue;
        }
        if (isa == ISA_AVX2) {
            densify_rows_avx2(w, begin, end, first, out_kind, out);
            continue;
        }
#endif
        densify_rows_portable(w, begin, end, first, out_kind, out);
    }
    return 0;
}

/* offsets[r] = the kept entries before row r (rows + 1 of them), from a bitmask; returns the total. */
int64_t sgpt_row_offsets(const uint8_t *mask, int64_t mask_size, int64_t rows, int64_t cols, int64_t *offsets) {
    int64_t total = 0;
    for (int64_t row = 0; row < rows; row++) {
        offsets[row] = total;
        int64_t done = 0, first = row * cols;
        for (; done + 32 <= cols; done += 32) total += popcount64(mask_bits(mask, mask_size, first + done, 32));
        if (done < cols) total += popcount64(mask_bits(mask, mask_size, first + done, cols - done));
    }
    offsets[rows] = total;
    return total;
}

/* The packed row-major bitmask (`mask`, zeroed by the caller) of an N:M tensor from its in-group positions
 * (docs/FORMAT.md): 0, or ERROR_POSITIONS where they are out of range or not strictly increasing. */
int64_t sgpt_nm_mask(const uint8_t *positions, int64_t positions_size, int64_t rows, int64_t cols, int64_t m,
                     int64_t keep, uint8_t *mask) {
    if (m < 2 || cols % m || keep <= 0 || keep >= m) return ERROR_ARGUMENTS;
    for (int64_t row = 0; row < rows; row++)
        if (nm_row(row, cols, positions, positions_size, m, keep, mask, row * cols) < 0) return ERROR_POSITIONS;
    return 0;
}

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_kernels", .m_doc = "Sparse matrix kernels, called through ctypes.", .m_size = -1};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
