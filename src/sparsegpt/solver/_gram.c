/* bfloat16 matrix products summed in float32 by AVX512_BF16 dot products (vdpbf16ps), for hosts whose
 * BLAS has no fast bf16 × bf16 → float32 routine (MKL runs its own at the float32 rate on AMD EPYC, where
 * torch's bf16 products run 4× faster; solver/gram.py measures which to use). Two operations:
 *   sgpt_gram_bf16    G += XᵀX on and above the diagonal (nothing below it is touched), for X (tokens,
 *                     width) bf16 and G float32, both row-major;
 *   sgpt_linear_bf16  Y = X·Wᵀ (or Y += X·Wᵀ) for X (tokens, k) bf16, Y float32, and W (n, k) packed once
 *                     by sgpt_pack_bf16.
 * Each product of two bf16 numbers is exact in float32; vdpbf16ps adds two of them to a float32 lane
 * with float32 rounding (denormal inputs and results are flushed to zero), so the results are float32
 * sums of the exact products, in another order than a float32 BLAS takes.
 *
 * One register tile does the work: 8 rows × 48 columns of float32 sums (24 zmm), fed at each step by
 * eight 32-bit broadcasts (one row's pair of consecutive k) and three loads of 16 pairs (one pair per
 * column). Operands are packed into that order, zero-padded to whole tiles, in panels of 48 columns:
 * panel q, step s holds the pairs (k = 2s, 2s + 1) of columns 48q … 48q + 47, 48 32-bit words in a row.
 * For the Gram matrix one packing of a chunk of tokens serves both sides (a tile's rows are 8
 * consecutive columns of one panel); for a linear layer W is packed once and X in blocks of 8 rows.
 * Column panels are split over `threads` OpenMP threads. Called through ctypes, which releases the GIL. */
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

/* Steps first..last of rows `even` and `odd` (NULL: zeros) of a row-major bf16 matrix, into panel
 * layout: out[q][s - first][c] = pair(even[48q + c], odd[48q + c]) (zero beyond `columns`). */
static void pack_pair_rows(const uint16_t *even, const uint16_t *odd, int64_t columns, uint32_t *out, int64_t step,
                           int64_t steps) {
    for (int64_t q = 0; q < panels_of(columns); q++) {
        uint32_t *target = out + (q * steps + step) * PANEL;
        int64_t start = q * PANEL, width = columns - start < PANEL ? columns - start : PANEL;
        for (int64_t c = 0; c < width; c++) target[c] = pair(even[start + c], odd != NULL ? odd[start + c] : 0);
        for (int64_t c = width; c < PANEL; c++) target[c] = 0;
    }
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

static int available(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bf16");
}

/* sums[r][v] (+)= Σ_s a[s·a_step + r] · b[s·PANEL + 16v …] over `steps` steps, pairs by pairs; then the
 * rows r < rows of out (row stride ldo) get the sums over columns c < columns that `keep` allows. */
AVX512BF16 static void tile(const uint32_t *a, int64_t a_step, const uint32_t *b, int64_t steps, float *out,
                            int64_t ldo, int64_t rows, int64_t columns, int64_t diagonal, int accumulate) {
    __m512 sums[ROWS][VECTORS];
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; r++)
#pragma GCC unroll 3
        for (int v = 0; v < VECTORS; v++) sums[r][v] = _mm512_setzero_ps();
    for (int64_t s = 0; s < steps; s++) {
        const uint32_t *row = a + s * a_step, *column = b + s * PANEL;
        __m512bh b0 = (__m512bh)_mm512_loadu_si512(column), b1 = (__m512bh)_mm512_loadu_si512(column + 16),
                 b2 = (__m512bh)_mm512_loadu_si512(column + 32);
#pragma GCC unroll 8
        for (int r = 0; r < ROWS; r++) {
            __m512bh x = (__m512bh)_mm512_set1_epi32((int)row[r]);
            sums[r][0] = _mm512_dpbf16_ps(sums[r][0], x, b0);
            sums[r][1] = _mm512_dpbf16_ps(sums[r][1], x, b1);
            sums[r][2] = _mm512_dpbf16_ps(sums[r][2], x, b2);
        }
    }
    /* `diagonal` >= 0: row r keeps only columns c >= diagonal + r (the upper triangle of a Gram tile) */
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; r++) {
        if (r >= rows) break;
        int64_t first = diagonal >= 0 ? diagonal + r : 0;
#pragma GCC unroll 3
        for (int v = 0; v < VECTORS; v++) {
            int64_t low = first - 16 * v, high = columns - 16 * v;
            low = low < 0 ? 0 : low > 16 ? 16 : low;
            high = high < 0 ? 0 : high > 16 ? 16 : high;
            if (low >= high) continue;
            __mmask16 keep = (__mmask16)(((1u << high) - 1) & ~((1u << low) - 1));
            float *target = out + r * ldo + 16 * v;
            __m512 value = sums[r][v];
            if (accumulate) value = _mm512_add_ps(value, _mm512_maskz_loadu_ps(keep, target));
            _mm512_mask_storeu_ps(target, keep, value);
        }
    }
}

AVX512BF16 static void gram_bf16(const uint16_t *x, int64_t tokens, int64_t width, int64_t ldx, float *gram,
                                 int64_t ldg, uint32_t *packed, int32_t threads) {
    int64_t panels = panels_of(width), pairs = (tokens + 1) / 2;
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    for (int64_t first = 0; first < pairs; first += STEPS) {
        int64_t steps = pairs - first < STEPS ? pairs - first : STEPS;
#pragma omp for schedule(static)
        for (int64_t s = 0; s < steps; s++) {
            int64_t t = 2 * (first + s);
            pack_pair_rows(x + t * ldx, t + 1 < tokens ? x + (t + 1) * ldx : NULL, width, packed, s, steps);
        }
        /* the implied barrier: every panel packed. Panel q's tiles are its rows' blocks up to its
         * diagonal, 6q + 6 of them: the widest first, handed out one panel at a time. */
#pragma omp for schedule(dynamic, 1)
        for (int64_t index = 0; index < panels; index++) {
            int64_t q = panels - 1 - index, start = q * PANEL;
            int64_t columns = width - start < PANEL ? width - start : PANEL;
            for (int64_t i = 0; i < start + columns; i += ROWS) {
                const uint32_t *a = packed + ((i / PANEL) * steps) * PANEL + i % PANEL;
                int64_t rows = width - i < ROWS ? width - i : ROWS;
                int64_t diagonal = i + ROWS > start ? i - start : -1;
                tile(a, PANEL, packed + q * steps * PANEL, steps, gram + i * ldg + start, ldg, rows, columns,
                     diagonal, 1);
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
                    tile(packed + (b * pairs + first) * ROWS, ROWS, weight + (q * pairs + first) * PANEL, steps,
                         out + b * ROWS * ldo + start, ldo, rows, columns, -1, accumulate || first > 0);
                }
            }
        }
    }
}
#else
static int available(void) { return 0; }
#endif

/* --- entry points (0, or a negative error) -------------------------------------------------------- */

/* Whether this processor runs the kernels (AVX512_BF16). */
int32_t sgpt_bf16_available(void) { return available(); }

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

/* gram (width, width, row stride ldg) += xᵀx on and above its diagonal, x (tokens, width, row stride ldx). */
int64_t sgpt_gram_bf16(const uint16_t *x, int64_t tokens, int64_t width, int64_t ldx, float *gram, int64_t ldg,
                       int32_t threads) {
    if (tokens < 0 || width <= 0 || ldx < width || ldg < width) return ERROR_ARGUMENTS;
    if (!available()) return ERROR_ISA;
    if (tokens == 0) return 0;
#if defined(__GNUC__) && defined(__x86_64__)
    uint32_t *packed = malloc((size_t)(panels_of(width) * STEPS * PANEL) * sizeof *packed);
    if (packed == NULL) return ERROR_MEMORY;
    gram_bf16(x, tokens, width, ldx, gram, ldg, packed, threads);
    free(packed);
#endif
    return 0;
}

/* out (tokens, n, row stride ldo) = x · Wᵀ, or += with `accumulate`; x (tokens, k, row stride ldx) and
 * `weight` packed from W (n, k) by sgpt_pack_bf16. */
int64_t sgpt_linear_bf16(const uint16_t *x, int64_t tokens, int64_t k, int64_t ldx, const uint32_t *weight,
                         int64_t n, float *out, int64_t ldo, int32_t accumulate, int32_t threads) {
    if (tokens < 0 || k <= 0 || n <= 0 || ldx < k || ldo < n) return ERROR_ARGUMENTS;
    if (!available()) return ERROR_ISA;
    if (tokens == 0) return 0;
#if defined(__GNUC__) && defined(__x86_64__)
    uint32_t *packed = malloc((size_t)(((tokens + ROWS - 1) / ROWS) * ((k + 1) / 2) * ROWS) * sizeof *packed);
    if (packed == NULL) return ERROR_MEMORY;
    linear_bf16(x, tokens, k, ldx, weight, n, out, ldo, accumulate, packed, threads);
    free(packed);
#endif
    return 0;
}

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_gram", .m_doc = "bfloat16 products summed in float32, called through ctypes.",
    .m_size = -1};

PyMODINIT_FUNC PyInit__gram(void) { return PyModule_Create(&module); }
