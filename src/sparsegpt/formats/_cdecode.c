/* One-pass decoding of a compact-format tensor (docs/FORMAT.md): where the kept entries are (all of them,
 * a bitmask, or N:M in-group positions), their values (stored bit patterns, or quantization codes with a
 * float16 scale and an integer zero point per group of columns), written straight into the dense output.
 *
 * The Python reader in compact.py does the same with several numpy/torch passes and is the reference this
 * kernel is tested against, bit for bit. Called through ctypes (which releases the GIL), so tensors decode
 * in parallel on worker threads. A trivial module init lets setuptools build it as an extension module.
 *
 * Dequantization follows sparsegpt.solver.quant.dequantize_groups: c·s − z·s in float32. Both products are
 * exact (c, z < 2^8, s a float16), so the result is (c − z)·s rounded once, whatever the instruction order,
 * and a pruned entry (c = z) is +0.0. Rounding to bfloat16 and float16 is to nearest, ties to even, as
 * torch does; the caller sends tensors with non-finite scales to the Python reader (NaN payloads). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { LAYOUT_ALL = 0, LAYOUT_BITMASK = 1, LAYOUT_NM = 2 };
enum { OUT_FLOAT32 = 0, OUT_BFLOAT16 = 1, OUT_FLOAT16 = 2 };
enum { ERROR_MEMORY = -2, ERROR_ARGUMENTS = -3 }; /* and ERROR_POSITIONS (_encoding.h) */

#include "_encoding.h"

/* The same from a table: `table[code]` holds the column bits of a group whose `keep` positions read as
 * `code` (keep·b <= 8 bits, m <= 8), with bit 15 set where they are invalid. */
static void nm_table(int64_t m, int64_t keep, int64_t bits, uint16_t *table) {
    for (int64_t code = 0; code < (1 << (keep * bits)); code++) {
        uint16_t entry = 0;
        int64_t previous = -1;
        for (int64_t j = 0; j < keep; j++) {
            int64_t place = (code >> (j * bits)) & ((1 << bits) - 1);
            if (place >= m || place <= previous)
                entry |= 0x8000;
            else
                entry |= (uint16_t)(1u << place);
            previous = place;
        }
        table[code] = entry;
    }
}

/* `table` for whole bytes of positions holding 8 / per_group groups (2:4: two groups, 3:4: four): the bits
 * of their 8·m / per_group columns, with bit 31 set where a group is invalid. */
static void nm_byte_table(int64_t m, int64_t per_group, const uint16_t *table, uint32_t *bytes) {
    for (uint32_t byte = 0; byte < 256; byte++) {
        uint32_t entry = 0;
        for (int64_t g = 0; g < 8 / per_group; g++) {
            uint16_t group = table[(byte >> (g * per_group)) & ((1u << per_group) - 1)];
            entry |= (uint32_t)(group & 0xff) << (g * m) | (group & 0x8000 ? 0x80000000u : 0);
        }
        bytes[byte] = entry;
    }
}

static int64_t nm_row_from_table(int64_t row, int64_t cols, const uint8_t *positions, int64_t positions_size,
                                 int64_t m, int64_t per_group, const uint16_t *table, const uint32_t *bytes,
                                 uint8_t *row_bits) {
    int64_t groups = cols / m, first = row * groups * per_group, written = 0, filled = 0, group = 0;
    uint64_t pending = 0;
    uint32_t seen = 0;
    if (bytes != NULL && first % 8 == 0) { /* whole bytes of positions, each 8 * m / per_group columns */
        int64_t per_byte = 8 / per_group, out_bytes = per_byte * m / 8;
        for (; group + per_byte <= groups; group += per_byte) {
            uint32_t entry = bytes[positions[(first + group * per_group) / 8]];
            seen |= entry;
            for (int64_t i = 0; i < out_bytes; i++) row_bits[written++] = (uint8_t)(entry >> (8 * i));
        }
    }
    for (; group < groups; group++) {
        uint16_t entry = table[bits_at(positions, positions_size, first + group * per_group, per_group)];
        seen |= entry & 0x8000 ? 0x80000000u : 0;
        pending |= (uint64_t)(entry & 0xff) << filled;
        for (filled += m; filled >= 8; filled -= 8, pending >>= 8) row_bits[written++] = (uint8_t)pending;
    }
    if (filled) row_bits[written] = (uint8_t)pending;
    return seen & 0x80000000u ? ERROR_POSITIONS : 0;
}

/* One row's mask: bit `first + c` of `bits` (`size` bytes) says whether column c is kept. */
typedef struct {
    const uint8_t *bits;
    int64_t size, first;
} RowMask;

static inline uint32_t chunk(RowMask mask, int64_t col, int64_t width) {
    return mask_bits(mask.bits, mask.size, mask.first + col, width);
}

/* Portable loops. Each walks the row in chunks of 8 columns (one byte `b` of its mask): column i of a chunk
 * takes the chunk's (prefix[b][i])-th next value if bit i is set, else zero bits, with no branch on the
 * mask (masks are unpredictable). */
typedef struct {
    uint8_t prefix[256][8]; /* set bits of b below i */
    uint32_t take[256][8];  /* all ones where bit i of b is set, else zero */
} Tables;

static void fill_tables(Tables *tables) {
    for (int b = 0; b < 256; b++)
        for (int i = 0, count = 0; i < 8; i++) {
            tables->prefix[b][i] = (uint8_t)count;
            tables->take[b][i] = (b >> i) & 1 ? 0xffffffffu : 0;
            count += (b >> i) & 1;
        }
}

/* Columns [0, cols) of a row from source[0...] (bit patterns of type T); reads clamped to source[last]. */
#define PLACE(T)                                                                                              \
    static void place_##T(const Tables *tables, RowMask mask, int64_t cols, const T *source, int64_t last,    \
                          T *target) {                                                                        \
        int64_t k = 0;                                                                                        \
        for (int64_t col = 0; col < cols; col += 8) {                                                         \
            int64_t width = cols - col < 8 ? cols - col : 8;                                                  \
            uint32_t b = chunk(mask, col, width);                                                             \
            const uint8_t *prefix = tables->prefix[b];                                                        \
            const uint32_t *take = tables->take[b];                                                           \
            if (width == 8 && k + 8 <= last) { /* the usual case: no clamping needed */                      \
                for (int i = 0; i < 8; i++) target[col + i] = source[k + prefix[i]] & (T)(int32_t)take[i];   \
            } else {                                                                                          \
                for (int i = 0; i < width; i++) {                                                             \
                    int64_t at = k + prefix[i] < last ? k + prefix[i] : last;                                 \
                    target[col + i] = source[at] & (T)(int32_t)take[i];                                       \
                }                                                                                             \
            }                                                                                                 \
            k += popcount64(b);                                                                               \
        }                                                                                                     \
    }
PLACE(uint8_t)
PLACE(uint16_t)
PLACE(uint32_t)
PLACE(uint64_t)

/* Columns [start, end) of a row from codes[0...] through `table`; returns how many codes it used. */
#define LOOK_UP(T)                                                                                            \
    static int64_t look_up_##T(const Tables *tables, RowMask mask, int64_t start, int64_t end,               \
                               const uint8_t *codes, const T *table, T *target) {                             \
        int64_t j = 0;                                                                                        \
        for (int64_t col = start; col < end; col += 8) {                                                      \
            int64_t width = end - col < 8 ? end - col : 8;                                                    \
            uint32_t b = chunk(mask, col, width);                                                             \
            const uint8_t *prefix = tables->prefix[b];                                                        \
            for (int i = 0; i < width; i++) {                                                                 \
                /* a pruned column reads some code (a valid one: rows end in zeroed padding), then masks */   \
                target[col + i] = table[codes[j + prefix[i]]] & (T)tables->take[b][i];                        \
            }                                                                                                 \
            j += popcount64(b);                                                                               \
        }                                                                                                     \
        return j;                                                                                             \
    }
LOOK_UP(uint16_t)
LOOK_UP(uint32_t)

/* AVX-512 loops (VBMI2's expand instructions do the placing: 32 columns per instruction), used where the
 * processor has them; the same results as the portable loops, which the tests check. */
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define VECTOR __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt")))

static int vector_available(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi2");
}

VECTOR static void place_vector16(RowMask mask, int64_t cols, const uint16_t *source, uint16_t *target) {
    for (int64_t col = 0; col < cols; col += 32) {
        int64_t width = cols - col < 32 ? cols - col : 32;
        uint32_t b = chunk(mask, col, width);
        int count = __builtin_popcount(b);
        __m512i values = _mm512_maskz_loadu_epi16((__mmask32)((1ull << count) - 1), source);
        _mm512_mask_storeu_epi16(target + col, (__mmask32)((1ull << width) - 1),
                                 _mm512_maskz_expand_epi16((__mmask32)b, values));
        source += count;
    }
}

VECTOR static void place_vector32(RowMask mask, int64_t cols, const uint32_t *source, uint32_t *target) {
    for (int64_t col = 0; col < cols; col += 16) {
        int64_t width = cols - col < 16 ? cols - col : 16;
        uint32_t b = chunk(mask, col, width);
        int count = __builtin_popcount(b);
        __m512i values = _mm512_maskz_loadu_epi32((__mmask16)((1u << count) - 1), source);
        _mm512_mask_storeu_epi32(target + col, (__mmask16)((1u << width) - 1),
                                 _mm512_maskz_expand_epi32((__mmask16)b, values));
        source += count;
    }
}

/* 16-bit outputs from a table of at most 32 entries (codes of up to 4 bits, plus the zero entry). */
VECTOR static int64_t look_up_vector16(RowMask mask, int64_t start, int64_t end, const uint8_t *codes,
                                       const uint16_t *table32, int64_t levels, uint16_t *target) {
    __m512i table = _mm512_loadu_si512(table32);
    __m256i zero_entry = _mm256_set1_epi8((char)levels);
    int64_t j = 0;
    for (int64_t col = start; col < end; col += 32) {
        int64_t width = end - col < 32 ? end - col : 32;
        uint32_t b = chunk(mask, col, width);
        int count = __builtin_popcount(b);
        __m256i packed = _mm256_maskz_loadu_epi8((__mmask32)((1ull << count) - 1), codes + j);
        __m256i placed = _mm256_mask_expand_epi8(zero_entry, (__mmask32)b, packed);
        __m512i looked_up = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(placed), table);
        _mm512_mask_storeu_epi16(target + col, (__mmask32)((1ull << width) - 1), looked_up);
        j += count;
    }
    return j;
}
VECTOR static int64_t count_bits_vector(const uint8_t *bits, int64_t size, int64_t first, int64_t count) {
    int64_t total = 0, done = 0;
    for (; done + 32 <= count; done += 32) total += __builtin_popcount(mask_bits(bits, size, first + done, 32));
    return total + __builtin_popcount(mask_bits(bits, size, first + done, count - done));
}
#else
static int vector_available(void) { return 0; }
#endif

/* How many of the `count` bits from bit `first` of a bit stream are set. */
static int64_t count_bits(const uint8_t *bits, int64_t size, int64_t first, int64_t count, int vector) {
#if defined(__GNUC__) && defined(__x86_64__)
    if (vector) return count_bits_vector(bits, size, first, count);
#endif
    int64_t total = 0, done = 0;
    for (; done + 32 <= count; done += 32) total += popcount64(mask_bits(bits, size, first + done, 32));
    return total + popcount64(mask_bits(bits, size, first + done, count - done));
}

/* Unpacks `count` codes of `bits` bits from a little-endian bit stream into bytes. */
static void unpack_codes(const uint8_t *stream, int64_t count, int64_t bits, uint8_t *codes) {
    int64_t i = 0;
    if (bits == 4) { /* the common case, a byte at a time (the compiler vectorizes this) */
        for (int64_t byte = 0; byte < count / 2; byte++) {
            codes[2 * byte] = stream[byte] & 0x0f;
            codes[2 * byte + 1] = stream[byte] >> 4;
        }
        i = count / 2 * 2;
    }
    uint64_t buffer = 0;
    int64_t available = 0, next_byte = i * bits / 8;
    for (; i < count; i++) {
        while (available < bits) {
            buffer |= (uint64_t)stream[next_byte++] << available;
            available += 8;
        }
        codes[i] = (uint8_t)(buffer & ((1u << bits) - 1));
        buffer >>= bits;
        available -= bits;
    }
}

/* Decodes a (rows, cols) matrix into `out` (contiguous, row-major). Without `codes`, the `kept` stored
 * values of `itemsize` bytes are copied as bit patterns (pruned entries all-zero bits); with `codes`, the
 * `bits`-bit codes are dequantized with the (rows, ngroups) float16 `scales` and uint8 `zeros` of groups of
 * `group` columns, into float32, bfloat16 or float16 (`out_kind`). `vector` allows the AVX-512 loops.
 * Returns the number of entries the layout marks as kept (the caller compares it with `kept`; nothing is
 * read past `kept` values), or an error. */
int64_t sgpt_decode(int64_t rows, int64_t cols, int32_t layout, const uint8_t *mask, const uint8_t *positions,
                    int64_t positions_size, int64_t m, int64_t keep, int64_t kept, const uint8_t *values,
                    int64_t itemsize, const uint8_t *codes, int64_t codes_size, int64_t bits,
                    const uint16_t *scales, const uint8_t *zeros, int64_t group, int64_t ngroups, int32_t out_kind,
                    int32_t vector, void *out) {
    if (rows < 0 || cols <= 0 || (layout == LAYOUT_NM && (m < 2 || cols % m || keep <= 0 || keep >= m)) ||
        (codes == NULL && itemsize != 1 && itemsize != 2 && itemsize != 4 && itemsize != 8) ||
        (codes != NULL && (bits < 1 || bits > 8 || group <= 0 || ngroups != (cols + group - 1) / group)) ||
        (codes != NULL && (kept * bits + 7) / 8 > codes_size))
        return ERROR_ARGUMENTS;
    if (layout != LAYOUT_BITMASK) { /* these layouts mark a fixed number of entries */
        int64_t total = layout == LAYOUT_NM ? rows * (cols / m) * keep : rows * cols;
        if (total != kept) return total;
    }
    vector = vector && vector_available();
    static const uint8_t nothing[8] = {0};
    if (kept == 0) values = nothing; /* nothing stored: the clamped reads read this zero */
    int64_t last = kept > 0 ? kept - 1 : 0, levels = (int64_t)1 << bits;
    Tables tables;
    fill_tables(&tables);
    /* a row's own mask (N:M positions turned into bits, or all ones), and the codes unpacked */
    uint8_t *row_bits = malloc((size_t)(cols + 7) / 8), *unpacked = NULL;
    int64_t *row_counts = NULL;
    if (codes != NULL) unpacked = malloc((size_t)kept + 64);
    if (row_bits == NULL || (codes != NULL && unpacked == NULL)) {
        free(row_bits);
        free(unpacked);
        return ERROR_MEMORY;
    }
    if (layout == LAYOUT_ALL) memset(row_bits, 0xff, (size_t)(cols + 7) / 8);
    if (codes != NULL) {
        unpack_codes(codes, kept, bits, unpacked);
        memset(unpacked + kept, 0, 64); /* the portable loop reads up to 7 past a row's last code */
    }
    int64_t marked = 0, position_bits = 1;
    while (layout == LAYOUT_NM && (1 << position_bits) < m) position_bits++;
    int use_table = layout == LAYOUT_NM && m <= 8 && keep * position_bits <= 8;
    uint16_t positions_table[256];
    uint32_t positions_bytes[256];
    int64_t per_group = keep * position_bits;
    int use_bytes = use_table && 8 % per_group == 0 && (8 / per_group * m) % 8 == 0 && 8 / per_group * m <= 32;
    if (use_table) nm_table(m, keep, position_bits, positions_table);
    if (use_bytes) nm_byte_table(m, per_group, positions_table, positions_bytes);
    if (layout == LAYOUT_BITMASK) { /* count first: decode only if the mask marks exactly what is stored */
        row_counts = malloc((size_t)rows * sizeof *row_counts);
        if (row_counts == NULL) {
            free(row_bits);
            free(unpacked);
            return ERROR_MEMORY;
        }
        int64_t total = 0;
        for (int64_t row = 0; row < rows; row++) {
            row_counts[row] = count_bits(mask, (rows * cols + 7) / 8, row * cols, cols, vector);
            total += row_counts[row];
        }
        if (total != kept) {
            free(row_bits);
            free(unpacked);
            free(row_counts);
            return total;
        }
    }
    for (int64_t row = 0; row < rows; row++) {
        RowMask row_mask = {row_bits, (cols + 7) / 8, 0};
        if (layout == LAYOUT_BITMASK) {
            row_mask = (RowMask){mask, (rows * cols + 7) / 8, row * cols};
        } else if (layout == LAYOUT_NM) {
            int64_t status;
            if (use_table) {
                status = nm_row_from_table(row, cols, positions, positions_size, m, per_group, positions_table,
                                           use_bytes ? positions_bytes : NULL, row_bits);
            } else {
                memset(row_bits, 0, (size_t)(cols + 7) / 8);
                status = nm_row(row, cols, positions, positions_size, m, keep, row_bits, 0);
            }
            if (status < 0) {
                marked = ERROR_POSITIONS;
                break;
            }
        }
        int64_t k = marked;
        marked += layout == LAYOUT_BITMASK ? row_counts[row] : layout == LAYOUT_NM ? cols / m * keep : cols;
        int64_t base = row * cols;
        if (codes == NULL) {
            const uint8_t *source = values + k * itemsize;
            int64_t row_last = last - k;
#if defined(__GNUC__) && defined(__x86_64__)
            if (vector && itemsize == 2) {
                place_vector16(row_mask, cols, (const uint16_t *)source, (uint16_t *)out + base);
                continue;
            }
            if (vector && itemsize == 4) {
                place_vector32(row_mask, cols, (const uint32_t *)source, (uint32_t *)out + base);
                continue;
            }
#endif
            if (itemsize == 1)
                place_uint8_t(&tables, row_mask, cols, source, row_last, (uint8_t *)out + base);
            else if (itemsize == 2)
                place_uint16_t(&tables, row_mask, cols, (const uint16_t *)source, row_last, (uint16_t *)out + base);
            else if (itemsize == 4)
                place_uint32_t(&tables, row_mask, cols, (const uint32_t *)source, row_last, (uint32_t *)out + base);
            else
                place_uint64_t(&tables, row_mask, cols, (const uint64_t *)source, row_last, (uint64_t *)out + base);
            continue;
        }
        const uint8_t *row_codes = unpacked + k;
        for (int64_t g = 0; g < ngroups; g++) {
            int64_t start = g * group, end = start + group < cols ? start + group : cols;
            float scale = half_to_float(scales[row * ngroups + g]);
            float offset = -((float)zeros[row * ngroups + g] * scale);
            if (out_kind == OUT_FLOAT32) {
                uint32_t table[257];
                for (int64_t code = 0; code < levels; code++) table[code] = float_bits((float)code * scale + offset);
                table[levels] = 0;
                row_codes += look_up_uint32_t(&tables, row_mask, start, end, row_codes, table,
                                              (uint32_t *)out + base);
                continue;
            }
            uint16_t table[257];
            for (int64_t code = 0; code < levels; code++) {
                float value = (float)code * scale + offset;
                table[code] = out_kind == OUT_BFLOAT16 ? float_to_bfloat16(value) : float_to_half(value);
            }
            for (int64_t code = levels; code < 32 || code == levels; code++) table[code] = 0; /* zero entry */
#if defined(__GNUC__) && defined(__x86_64__)
            if (vector && levels < 32) {
                row_codes += look_up_vector16(row_mask, start, end, row_codes, table, levels, (uint16_t *)out + base);
                continue;
            }
#endif
            row_codes += look_up_uint16_t(&tables, row_mask, start, end, row_codes, table,
                                          (uint16_t *)out + base);
        }
    }
    free(row_bits);
    free(unpacked);
    free(row_counts);
    return marked;
}

/* Rounds n float32 values to bfloat16 (out_kind 1) or float16 (2) bit patterns: exposed for the tests. */
void sgpt_round(const float *in, uint16_t *out, int64_t n, int32_t out_kind) {
    for (int64_t i = 0; i < n; i++) out[i] = out_kind == OUT_BFLOAT16 ? float_to_bfloat16(in[i]) : float_to_half(in[i]);
}

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_cdecode", .m_doc = "Native decoding kernel, called through ctypes.", .m_size = -1};

PyMODINIT_FUNC PyInit__cdecode(void) { return PyModule_Create(&module); }
