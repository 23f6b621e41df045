/* Matrix products summed in float32 by AVX-512 register tiles, for hosts whose BLAS runs below their
 * processor's rate: MKL picks its code by the processor's vendor, and on AMD EPYC its float32 products
 * and its bf16 × bf16 → float32 routine run at about half and a quarter of what AVX-512 reaches there
 * (solver/gram.py measures which backend to use). Three operations:
 *   sgpt_gram_bf16    G += XᵀX on and above the diagonal (nothing below it is touched), for X (tokens,
 *                     width) bf16 and G float32, both row-major, by AVX512_BF16 dot products (vdpbf16ps);
 *   sgpt_gram_f32     the same for float32 X, by fused multiply-adds;
 *   sgpt_linear_bf16  Y = X·Wᵀ (or Y += X·Wᵀ) for X (tokens, k) bf16, Y float32, and W (n, k) packed once
 *                     by sgpt_pack_bf16;
 * and the Gram matrix's diagonal alone, sgpt_column_squares (Wanda's squared input norms: d += Σ_t x[t]²
 * per column, in one pass over bf16 or float32 X without a float32 copy of it).
 * Each product of two bf16 numbers is exact in float32; vdpbf16ps adds two of them to a float32 lane
 * with float32 rounding (denormal inputs and results are flushed to zero), so the results are float32
 * sums of the exact products, in another order than a float32 BLAS takes.
 *
 * One register tile does the work: 8 rows × 48 columns of float32 sums (24 zmm), fed at each step by
 * eight 32-bit broadcasts and three loads of 16 words. A word is a pair of bf16 numbers (two consecutive
 * k of one row, which vdpbf16ps multiplies pairwise) or one float32 number. Operands are packed into
 * that order, zero-padded to whole tiles, in panels of 48 columns: panel q, step s holds the words of
 * columns 48q … 48q + 47, 48 words in a row. For a Gram matrix one packing of a chunk of tokens serves
 * both sides (a tile's rows are 8 consecutive columns of one panel); for a linear layer W is packed
 * once and X in blocks of 8 rows. Column panels are split over `threads` OpenMP threads. Called through
 * ctypes, which releases the GIL. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { ERROR_ARGUMENTS = -2, ERROR_ISA = -3, ERROR_MEMORY = -4 };
enum { ROWS = 8, PANEL = 48, VECTORS = PANEL / 16 };
/* Token pairs per packed chunk of a Gram matrix, and k pairs per pass of a linear product: 256 steps of
 * a 48-column panel are 48 KiB, what one core's L1 cache holds. */
enum { STEPS = 256 };

static inline uint32_t pair(uint16_t even, uint16_t odd) { return (uint32_t)even | ((uint32_t)odd << 16); }

static int64_t panels_of(int64_t columns) { return (columns + PANEL - 1) / PANEL; }

/* Step `step` (of `steps`) of every panel of a row-major matrix's `columns`: out[q][step][c] is
 * pair(even[48q + c], odd[48q + c]) for bf16 rows (`odd` NULL: zeros), or the float32 word
 * even[48q + c] for float32 rows (`f32`); zero beyond `columns`. */
static void pack_step(int f32, const void *even, const void *odd, int64_t columns, uint32_t *out, int64_t step,
                      int64_t steps) {
    for (int64_t q = 0; q < panels_of(columns); q++) {
        uint32_t *target = out + (q * steps + step) * PANEL;
        int64_t start = q * PANEL, width = columns - start < PANEL ? columns - start : PANEL;
        if (f32) {
            memcpy(target, (const uint32_t *)even + start, (size_t)width * sizeof *target);
        } else {
            const uint16_t *low = (const uint16_t *)even + start, *high = (const uint16_t *)odd + start;
            for (int64_t c = 0; c < width; c++) target[c] = pair(low[c], odd != NULL ? high[c] : 0);
        }
        for (int64_t c = width; c < PANEL; c++) target[c] = 0;
    }
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f,fma")))
#define AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

static int available(int f32) {
    __builtin_cpu_init();
    if (f32) return __builtin_cpu_supports("avx512f") != 0;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bf16");
}

#define DOT_BF16(sum, a, b) _mm512_dpbf16_ps(sum, (__m512bh)(a), (__m512bh)(b))
#define FMA_F32(sum, a, b) _mm512_fmadd_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b), sum)

/* One function per kind of word, the same code: sums[r][v] = Σ_s a[s·a_step + r] · b[s·PANEL + 16v …] over
 * `steps` steps (`multiply_add` of the words); then rows r < rows of out (row stride ldo) get (or, with
 * `accumulate`, add) the sums over columns c < columns, and only c >= diagonal + r where diagonal >= 0
 * (the upper triangle of a Gram tile). */
#define TILE(name, attributes, multiply_add)                                                                    \
    attributes static void name(const uint32_t *a, int64_t a_step, const uint32_t *b, int64_t steps, float *out,  \
                            int64_t ldo, int64_t rows, int64_t columns, int64_t diagonal, int accumulate) {   \
        __m512 sums[ROWS][VECTORS];                                                                           \
        _Pragma("GCC unroll 8") for (int r = 0; r < ROWS; r++)                                                \
            _Pragma("GCC unroll 3") for (int v = 0; v < VECTORS; v++) sums[r][v] = _mm512_setzero_ps();      \
        for (int64_t s = 0; s < steps; s++) {                                                                 \
            const uint32_t *row = a + s * a_step, *column = b + s * PANEL;                                    \
            __m512i b0 = _mm512_loadu_si512(column), b1 = _mm512_loadu_si512(column + 16),                    \
                    b2 = _mm512_loadu_si512(column + 32);                                                     \
            _Pragma("GCC unroll 8") for (int r = 0; r < ROWS; r++) {                                          \
                __m512i x = _mm512_set1_epi32((int)row[r]);                                                   \
                sums[r][0] = multiply_add(sums[r][0], x, b0);                                                 \
                sums[r][1] = multiply_add(sums[r][1], x, b1);                                                 \
                sums[r][2] = multiply_add(sums[r][2], x, b2);                                                 \
            }                                                                                                 \
        }                                                                                                     \
        _Pragma("GCC unroll 8") for (int r = 0; r < ROWS; r++) {                                              \
            if (r >= rows) break;                                                                             \
            int64_t first = diagonal >= 0 ? diagonal + r : 0;                                                 \
            _Pragma("GCC unroll 3") for (int v = 0; v < VECTORS; v++) {                                       \
                int64_t low = first - 16 * v, high = columns - 16 * v;                                        \
                low = low < 0 ? 0 : low > 16 ? 16 : low;                                                      \
                high = high < 0 ? 0 : high > 16 ? 16 : high;                                                  \
                if (low >= high) continue;                                                                    \
                __mmask16 keep = (__mmask16)(((1u << high) - 1) & ~((1u << low) - 1));                        \
                float *target = out + r * ldo + 16 * v;                                                       \
                __m512 value = sums[r][v];                                                                    \
                if (accumulate) value = _mm512_add_ps(value, _mm512_maskz_loadu_ps(keep, target));            \
                _mm512_mask_storeu_ps(target, keep, value);                                                   \
            }                                                                                                 \
        }                                                                                                     \
    }

TILE(tile_bf16, AVX512BF16, DOT_BF16)
TILE(tile_f32, AVX512, FMA_F32)

/* Token pairs (bf16) or tokens (float32, `f32`) per chunk: each chunk is packed, then its tiles summed. */
static void gram(int f32, const void *x, int64_t tokens, int64_t width, int64_t ldx, float *out, int64_t ldg,
                 uint32_t *packed, int32_t threads) {
    int64_t panels = panels_of(width), steps_total = f32 ? tokens : (tokens + 1) / 2;
    size_t size = f32 ? sizeof(float) : sizeof(uint16_t);
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    for (int64_t first = 0; first < steps_total; first += STEPS) {
        int64_t steps = steps_total - first < STEPS ? steps_total - first : STEPS;
#pragma omp for schedule(static)
        for (int64_t s = 0; s < steps; s++) {
            int64_t t = f32 ? first + s : 2 * (first + s);
            const char *even = (const char *)x + (size_t)(t * ldx) * size;
            const char *odd = !f32 && t + 1 < tokens ? even + (size_t)ldx * size : NULL;
            pack_step(f32, even, odd, width, packed, s, steps);
        }
        /* the implied barrier: every panel packed. Panel q's tiles are its rows' blocks up to its
         * diagonal, 6q + 6 of them: the widest first, handed out one panel at a time. */
#pragma omp for schedule(dynamic, 1)
        for (int64_t index = 0; index < panels; index++) {
            int64_t q = panels - 1 - index, start = q * PANEL;
            int64_t columns = width - start < PANEL ? width - start : PANEL;
            for (int64_t i = 0; i < start + columns; i += ROWS) {
                const uint32_t *a = packed + ((i / PANEL) * steps) * PANEL + i % PANEL;
                const uint32_t *b = packed + q * steps * PANEL;
                int64_t rows = width - i < ROWS ? width - i : ROWS;
                int64_t diagonal = i + ROWS > start ? i - start : -1;
                float *target = out + i * ldg + start;
                if (f32)
                    tile_f32(a, PANEL, b, steps, target, ldg, rows, columns, diagonal, 1);
                else
                    tile_bf16(a, PANEL, b, steps, target, ldg, rows, columns, diagonal, 1);
            }
        }
    }
}

AVX512BF16 static void linear_bf16(const uint16_t *x, int64_t tokens, int64_t k, int64_t ldx, const uint32_t *weight,
                                   int64_t n, float *out, int64_t ldo, int accumulate, uint32_t *packed,
                                   int32_t threads) {
    int64_t blocks = (tokens + ROWS - 1) / ROWS, pairs = (k + 1) / 2, panels = panels_of(n);
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        /* X in blocks of 8 rows: packed[b][s][r] = pair(x[8b + r][2s], x[8b + r][2s + 1]) */
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++)
            for (int64_t r = 0; r < ROWS; r++) {
                uint32_t *target = packed + b * pairs * ROWS + r;
                int64_t t = b * ROWS + r;
                const uint16_t *row = x + t * ldx;
                for (int64_t s = 0; s < pairs; s++)
                    target[s * ROWS] = t < tokens ? pair(row[2 * s], 2 * s + 1 < k ? row[2 * s + 1] : 0) : 0;
            }
#pragma omp for schedule(static)
        for (int64_t q = 0; q < panels; q++) {
            int64_t start = q * PANEL, columns = n - start < PANEL ? n - start : PANEL;
            for (int64_t first = 0; first < pairs; first += STEPS) {
                int64_t steps = pairs - first < STEPS ? pairs - first : STEPS;
                for (int64_t b = 0; b < blocks; b++) {
                    int64_t rows = tokens - b * ROWS < ROWS ? tokens - b * ROWS : ROWS;
                    tile_bf16(packed + (b * pairs + first) * ROWS, ROWS, weight + (q * pairs + first) * PANEL, steps,
                         out + b * ROWS * ldo + start, ldo, rows, columns, -1, accumulate || first > 0);
                }
            }
        }
    }
}
#define AVX512BW __attribute__((target("avx512f,avx512bw,avx512vl")))

enum { SQUARES_CHUNK = 256 }; /* tokens column_squares sums before adding to its output (as hessian.py) */

static int squares_available(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}

/* 16 values of row-major bf16 or float32 data from `index` on, as float32; lanes outside `lanes` zero. */
AVX512BW static inline __m512 load_lanes(const void *data, int64_t index, int f32, __mmask16 lanes) {
    if (f32) return _mm512_maskz_loadu_ps(lanes, (const float *)data + index);
    __m256i bits = _mm256_maskz_loadu_epi16(lanes, (const uint16_t *)data + index);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

/* out[j] += Σ_t x[t, j]² for x (tokens, width, row stride ldx): each square rounded to float32 and added in
 * token order within chunks of SQUARES_CHUNK tokens, each chunk's sums then added to out (what
 * solver/hessian.py sums by torch). Tasks of 64 columns, four vectors of sums each. */
AVX512BW static void column_squares(int f32, const void *x, int64_t tokens, int64_t width, int64_t ldx, float *out,
                                    int32_t threads) {
    int64_t tasks = (width + 63) / 64;
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1)
    for (int64_t task = 0; task < tasks; task++) {
        int64_t first = task * 64;
        __mmask16 lanes[4];
        __m512 sums[4];
        for (int v = 0; v < 4; v++) {
            int64_t left = width - first - 16 * v;
            lanes[v] = left >= 16 ? (__mmask16)0xffff : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
        }
        for (int64_t start = 0; start < tokens; start += SQUARES_CHUNK) {
            int64_t end = start + SQUARES_CHUNK < tokens ? start + SQUARES_CHUNK : tokens;
            for (int v = 0; v < 4; v++) sums[v] = _mm512_setzero_ps();
            for (int64_t t = start; t < end; t++)
                for (int v = 0; v < 4; v++) {
                    __m512 value = load_lanes(x, t * ldx + first + 16 * v, f32, lanes[v]);
                    sums[v] = _mm512_add_ps(sums[v], _mm512_mul_ps(value, value));
                }
            for (int v = 0; v < 4; v++) {
                __m512 total = _mm512_add_ps(_mm512_maskz_loadu_ps(lanes[v], out + first + 16 * v), sums[v]);
                _mm512_mask_storeu_ps(out + first + 16 * v, lanes[v], total);
            }
        }
    }
}
#else
static int available(int f32) { (void)f32; return 0; }
static int squares_available(void) { return 0; }
#endif

/* --- entry points (0, or a negative error) -------------------------------------------------------- */

/* Whether this processor runs the bf16 kernels (AVX512_BF16), and the float32 one (AVX-512 F). */
int32_t sgpt_bf16_available(void) { return available(0); }

int32_t sgpt_f32_available(void) { return available(1); }

/* 32-bit words sgpt_pack_bf16 writes for an (n, k) weight. */
int64_t sgpt_packed_size(int64_t n, int64_t k) { return panels_of(n) * ((k + 1) / 2) * PANEL; }

/* W (n, k) bf16, row stride ldw, into the panel layout sgpt_linear_bf16 reads (sgpt_packed_size words). */
int64_t sgpt_pack_bf16(const uint16_t *w, int64_t n, int64_t k, int64_t ldw, uint32_t *out) {
    if (n <= 0 || k <= 0 || ldw < k) return ERROR_ARGUMENTS;
    int64_t pairs = (k + 1) / 2;
    for (int64_t q = 0; q < panels_of(n); q++)
        for (int64_t c = 0; c < PANEL; c++) {
            int64_t row = q * PANEL + c;
            for (int64_t s = 0; s < pairs; s++) {
                uint16_t even = row < n ? w[row * ldw + 2 * s] : 0;
                uint16_t odd = row < n && 2 * s + 1 < k ? w[row * ldw + 2 * s + 1] : 0;
                out[(q * pairs + s) * PANEL + c] = pair(even, odd);
            }
        }
    return 0;
}

static int64_t gram_entry(int f32, const void *x, int64_t tokens, int64_t width, int64_t ldx, float *out,
                          int64_t ldg, int32_t threads) {
    if (tokens < 0 || width <= 0 || ldx < width || ldg < width) return ERROR_ARGUMENTS;
    if (!available(f32)) return ERROR_ISA;
    if (tokens == 0) return 0;
#if defined(__GNUC__) && defined(__x86_64__)
    uint32_t *packed = malloc((size_t)(panels_of(width) * STEPS * PANEL) * sizeof *packed);
    if (packed == NULL) return ERROR_MEMORY;
    gram(f32, x, tokens, width, ldx, out, ldg, packed, threads);
    free(packed);
#endif
    return 0;
}

/* gram (width, width, row stride ldg) += xᵀx on and above its diagonal, x (tokens, width, row stride ldx)
 * bf16 or float32. */
int64_t sgpt_gram_bf16(const uint16_t *x, int64_t tokens, int64_t width, int64_t ldx, float *gram, int64_t ldg,
                       int32_t threads) {
    return gram_entry(0, x, tokens, width, ldx, gram, ldg, threads);
}

int64_t sgpt_gram_f32(const float *x, int64_t tokens, int64_t width, int64_t ldx, float *gram, int64_t ldg,
                      int32_t threads) {
    return gram_entry(1, x, tokens, width, ldx, gram, ldg, threads);
}

/* out (tokens, n, row stride ldo) = x · Wᵀ, or += with `accumulate`; x (tokens, k, row stride ldx) and
 * `weight` packed from W (n, k) by sgpt_pack_bf16. */
int64_t sgpt_linear_bf16(const uint16_t *x, int64_t tokens, int64_t k, int64_t ldx, const uint32_t *weight,
                         int64_t n, float *out, int64_t ldo, int32_t accumulate, int32_t threads) {
    if (tokens < 0 || k <= 0 || n <= 0 || ldx < k || ldo < n) return ERROR_ARGUMENTS;
    if (!available(0)) return ERROR_ISA;
    if (tokens == 0) return 0;
#if defined(__GNUC__) && defined(__x86_64__)
    uint32_t *packed = malloc((size_t)(((tokens + ROWS - 1) / ROWS) * ((k + 1) / 2) * ROWS) * sizeof *packed);
    if (packed == NULL) return ERROR_MEMORY;
    linear_bf16(x, tokens, k, ldx, weight, n, out, ldo, accumulate, packed, threads);
    free(packed);
#endif
    return 0;
}

/* out (width float32 values) += the column sums of squares of x (tokens, width, row stride ldx), bf16 or
 * float32 (`f32`). */
int64_t sgpt_column_squares(const void *x, int64_t tokens, int64_t width, int64_t ldx, int32_t f32, float *out,
                            int32_t threads) {
    if (tokens < 0 || width <= 0 || ldx < width) return ERROR_ARGUMENTS;
    if (!squares_available()) return ERROR_ISA;
#if defined(__GNUC__) && defined(__x86_64__)
    column_squares(f32 != 0, x, tokens, width, ldx, out, threads);
#else
    (void)x, (void)f32, (void)out, (void)threads;
#endif
    return 0;
}

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_gram", .m_doc = "Gram matrices and bf16 products summed in float32, called through ctypes.",
    .m_size = -1};

PyMODINIT_FUNC PyInit__gram(void) { return PyModule_Create(&module); }
