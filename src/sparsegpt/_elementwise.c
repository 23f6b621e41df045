/* The elementwise steps of a transformer block's forward, each fused into one pass over memory, for the CPU
 * forwards of calibration (fused.py decides when they run). In torch each is a chain of ops that reads and
 * writes the whole activation per op (RMSNorm: a square, a mean, a reciprocal square root and two
 * products; rotary embeddings: a slice copy, a negation, two products and a sum for queries and keys
 * alike); on a two-core host those passes took a fifth of a block's bf16 forward.
 *
 *   silu_mul:  out = silu(gate) · up,  silu(g) = g / (1 + e^−g)      (a gated MLP's activation and gating)
 *   rms_norm:  out[r] = weight · x[r] / sqrt(mean(x[r]²) + eps)      (per row of `width` values)
 *   rotary:    out = x · cos + rotate_half(x) · sin,  rotate_half(x) = (−x₂, x₁), x = (x₁, x₂) halves
 *
 * Values are float32 or bfloat16 (kind 0 or 1). Each kernel rounds where torch's ops round, to the kind
 * torch's type promotion gives, so its results are torch's: rotary bit for bit; rms_norm up to the order of
 * its sum of squares; silu_mul up to its exponential (an error of about one float32 ulp before the product
 * is rounded). Rounding to bfloat16 is to nearest even on the bit pattern (finite values). AVX-512 (F, BW, VL):
 * elsewhere the entry points return ERROR_ISA and the caller runs torch's ops. OpenMP threads over rows or
 * chunks; called through ctypes, which releases the GIL. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>

enum { ERROR_ARGUMENTS = -2, ERROR_ISA = -3 };
enum { KIND_FLOAT32 = 0, KIND_BFLOAT16 = 1 };
enum { CHUNK = 4096 };         /* values of silu_mul per OpenMP task */

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma")))

static int available(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}

#include "_exp.h"

/* Lanes `lanes` of 16 values from `data` + `index` as float32 (others zero). */
AVX512 static inline __m512 load16(const void *data, int64_t index, int32_t kind, __mmask16 lanes) {
    if (kind == KIND_BFLOAT16) {
        __m256i bits = _mm256_maskz_loadu_epi16(lanes, (const uint16_t *)data + index);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
    }
    return _mm512_maskz_loadu_ps(lanes, (const float *)data + index);
}

/* float32 values rounded to bfloat16 (nearest, ties to even), still as float32. */
AVX512 static inline __m512 round_bf16(__m512 value) {
    __m512i bits = _mm512_castps_si512(value);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    bits = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    return _mm512_castsi512_ps(_mm512_and_si512(bits, _mm512_set1_epi32((int)0xffff0000u)));
}

/* `value` rounded to `kind`, still as float32: the rounding a torch op of that result kind does. */
AVX512 static inline __m512 rounded(__m512 value, int32_t kind) { return kind == KIND_BFLOAT16 ? round_bf16(value) : value; }

/* Lanes `lanes` of `value` (already rounded to `kind`) stored at `data` + `index`. */
AVX512 static inline void store16(void *data, int64_t index, __m512 value, int32_t kind, __mmask16 lanes) {
    if (kind == KIND_BFLOAT16) {
        __m256i bits = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(value), 16));
        _mm256_mask_storeu_epi16((uint16_t *)data + index, lanes, bits);
    } else {
        _mm512_mask_storeu_ps((float *)data + index, lanes, value);
    }
}

AVX512 static inline __mmask16 first_lanes(int64_t count) { return count >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << count) - 1); }

/* silu(g) = g / (1 + e^−g), with t = e^−|g| so that the exponential never overflows: g / (1 + t) for
 * g >= 0, g·t / (1 + t) for g < 0; for g below −87, −0 (torch's is −0 below −88.7, and under 1e−35 in
 * magnitude between). Rounded to `kind` (torch's silu of that kind), times up, rounded again. */
AVX512 static void silu_mul_avx512(const void *gate, const void *up, void *out, int64_t n, int32_t kind,
                                   int32_t threads) {
    int64_t chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1)
    for (int64_t c = 0; c < chunks; c++) {
        int64_t end = (c + 1) * CHUNK < n ? (c + 1) * CHUNK : n;
        for (int64_t i = c * CHUNK; i < end; i += 16) {
            __mmask16 lanes = first_lanes(end - i);
            __m512 g = load16(gate, i, kind, lanes), u = load16(up, i, kind, lanes);
            __m512 magnitude = _mm512_abs_ps(g);
            /* e^−|g|, zero beyond 87 (where exp_nonpositive stops): silu is then g or −0 */
            __m512 t = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(magnitude, _mm512_set1_ps(87.0f), _CMP_LE_OQ),
                                           exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), magnitude)));
            __mmask16 negative = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
            __m512 numerator = _mm512_mask_mul_ps(g, negative, g, t);
            __m512 silu = rounded(_mm512_div_ps(numerator, _mm512_add_ps(_mm512_set1_ps(1.0f), t)), kind);
            store16(out, i, rounded(_mm512_mul_ps(silu, u), kind), kind, lanes);
        }
    }
}

/* Per row: the squares rounded to float32 and summed in 16 lanes, their mean, its reciprocal square root
 * (one rounding each, as torch's pow, mean and rsqrt); x times it rounded to x's kind (transformers' cast
 * back to the input dtype), times the weight, rounded to the kind. */
AVX512 static void rms_norm_avx512(const void *x, const void *weight, void *out, int64_t rows, int64_t width,
                                   float eps, int32_t kind, int32_t threads) {
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1)
    for (int64_t r = 0; r < rows; r++) {
        int64_t base = r * width;
        __m512 sums = _mm512_setzero_ps();
        for (int64_t i = 0; i < width; i += 16) {
            __m512 v = load16(x, base + i, kind, first_lanes(width - i));
            sums = _mm512_add_ps(sums, _mm512_mul_ps(v, v));
        }
        float mean = _mm512_reduce_add_ps(sums) / (float)width;
        __m512 inverse = _mm512_set1_ps(1.0f / sqrtf(mean + eps));
        for (int64_t i = 0; i < width; i += 16) {
            __mmask16 lanes = first_lanes(width - i);
            __m512 normalized = rounded(_mm512_mul_ps(load16(x, base + i, kind, lanes), inverse), kind);
            __m512 scaled = rounded(_mm512_mul_ps(load16(weight, i, kind, lanes), normalized), kind);
            store16(out, base + i, scaled, kind, lanes);
        }
    }
}

/* x (batch, heads, positions, dim) at strides x_strides (batch, head, position; last dimension contiguous),
 * cos and sin (batch or 1, positions, dim) at cs_strides (batch, position; 0 to broadcast), out contiguous.
 * Each product rounded to out's kind, then their sum (torch's x * cos + rotate_half(x) * sin). */
AVX512 static void rotary_avx512(const void *x, const int64_t *x_strides, int32_t x_kind, const void *cos,
                                 const void *sin, const int64_t *cs_strides, int32_t cs_kind, void *out,
                                 int32_t out_kind, int64_t batch, int64_t heads, int64_t positions, int64_t dim,
                                 int32_t threads) {
    int64_t half = dim / 2, rows = batch * heads * positions;
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1)
    for (int64_t row = 0; row < rows; row++) {
        int64_t b = row / (heads * positions), h = row / positions % heads, p = row % positions;
        int64_t source = b * x_strides[0] + h * x_strides[1] + p * x_strides[2];
        int64_t table = b * cs_strides[0] + p * cs_strides[1], target = row * dim;
        for (int64_t i = 0; i < half; i += 16) {
            __mmask16 lanes = first_lanes(half - i);
            __m512 first = load16(x, source + i, x_kind, lanes), second = load16(x, source + half + i, x_kind, lanes);
            __m512 c1 = load16(cos, table + i, cs_kind, lanes), c2 = load16(cos, table + half + i, cs_kind, lanes);
            __m512 s1 = load16(sin, table + i, cs_kind, lanes), s2 = load16(sin, table + half + i, cs_kind, lanes);
            __m512 negated = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(second), _mm512_set1_epi32((int)0x80000000u)));
            __m512 low = _mm512_add_ps(rounded(_mm512_mul_ps(first, c1), out_kind),
                                       rounded(_mm512_mul_ps(negated, s1), out_kind));
            __m512 high = _mm512_add_ps(rounded(_mm512_mul_ps(second, c2), out_kind),
                                        rounded(_mm512_mul_ps(first, s2), out_kind));
            store16(out, target + i, rounded(low, out_kind), out_kind, lanes);
            store16(out, target + half + i, rounded(high, out_kind), out_kind, lanes);
        }
    }
}

#else
static int available(void) { return 0; }
#endif

static int kind_valid(int32_t kind) { return kind == KIND_FLOAT32 || kind == KIND_BFLOAT16; }

/* --- entry points (0, or a negative error) -------------------------------------------------------- */

/* Whether this processor runs the kernels (AVX-512 F, BW and VL). */
int32_t sgpt_elementwise_available(void) { return available(); }

/* out = silu(gate) · up over n contiguous values, all three of `kind`. */
int64_t sgpt_silu_mul(const void *gate, const void *up, void *out, int64_t n, int32_t kind, int32_t threads) {
    if (n < 0 || !kind_valid(kind)) return ERROR_ARGUMENTS;
    if (!available()) return ERROR_ISA;
#if defined(__GNUC__) && defined(__x86_64__)
    silu_mul_avx512(gate, up, out, n, kind, threads);
    return 0;
#else
    (void)gate, (void)up, (void)out, (void)threads;
    return ERROR_ISA;
#endif
}

/* out = RMSNorm of each of `rows` contiguous rows of `width` values of x, times weight (width values); x,
 * weight and out of `kind`. */
int64_t sgpt_rms_norm(const void *x, const void *weight, void *out, int64_t rows, int64_t width, float eps,
                      int32_t kind, int32_t threads) {
    if (rows < 0 || width <= 0 || !kind_valid(kind)) return ERROR_ARGUMENTS;
    if (!available()) return ERROR_ISA;
#if defined(__GNUC__) && defined(__x86_64__)
    rms_norm_avx512(x, weight, out, rows, width, eps, kind, threads);
    return 0;
#else
    (void)x, (void)weight, (void)out, (void)eps, (void)threads;
    return ERROR_ISA;
#endif
}

/* out = x · cos + rotate_half(x) · sin (see rotary_avx512 for the layouts); `dim` even; out's kind is
 * float32 unless x and cos/sin are both bfloat16. */
int64_t sgpt_rotary(const void *x, const int64_t *x_strides, int32_t x_kind, const void *cos, const void *sin,
                    const int64_t *cs_strides, int32_t cs_kind, void *out, int32_t out_kind, int64_t batch,
                    int64_t heads, int64_t positions, int64_t dim, int32_t threads) {
    if (batch < 0 || heads < 0 || positions < 0 || dim <= 0 || dim % 2 || !kind_valid(x_kind) ||
        !kind_valid(cs_kind) || out_kind != (x_kind == KIND_BFLOAT16 && cs_kind == KIND_BFLOAT16 ? KIND_BFLOAT16 : KIND_FLOAT32))
        return ERROR_ARGUMENTS;
    if (!available()) return ERROR_ISA;
#if defined(__GNUC__) && defined(__x86_64__)
    rotary_avx512(x, x_strides, x_kind, cos, sin, cs_strides, cs_kind, out, out_kind, batch, heads, positions, dim,
                  threads);
    return 0;
#else
    (void)x, (void)x_strides, (void)cos, (void)sin, (void)cs_strides, (void)out, (void)threads;
    return ERROR_ISA;
#endif
}

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_elementwise",
    .m_doc = "Fused elementwise steps of a transformer block (SiLU gating, RMSNorm, rotary), called through ctypes.",
    .m_size = -1};

PyMODINIT_FUNC PyInit__elementwise(void) { return PyModule_Create(&module); }
