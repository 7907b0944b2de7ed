/* pack.c: weight rows regrouped into x8 groups (llk.h, llk_pack_x8), and page release.
 *
 * Why: the x86 group kernels (x86_dot32.inc, x86_dotk8.inc) compute 8 weight rows at once, one
 * row per 32-bit vector lane. Read from the GGUF rows, each block of the 8 rows is first gathered
 * and transposed into lanes (8 scalar loads per header field, 8 unpacks per 4 dwords): on Zen 4
 * that decode cost as much as the dot products of 2-3 activation rows, so M = 2-4 (MTP verify
 * batches) cost up to 1.6x M = 1, and Q5_0 was compute-bound even at M = 1. Stored in lanes once,
 * a group is one linear stream of plain vector loads. No values change: the same bytes, moved.
 *
 * Per group and block b, 8 x TS bytes (TS = the block's size): qs dword t of rows 0..7 at
 * 32 t + 4 j (t < 4, or < 8 for Q8_0), then d of rows 0..7 (fp16), then m (Q4_1 / Q5_1, fp16),
 * then qh (Q5_0 / Q5_1, u32). The K-quants Q4_K Q5_K Q6_K (x86_dotk8.inc): dword t of the
 * super-block at 32 t + 4 j for every whole dword, then Q6_K's fp16 d. Bytes moved per matrix:
 * 2 x its size, once, at load.
 */
#define _DEFAULT_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "llk_internal.h"

typedef struct {
    int ts, qs_at, nq, m_at, h_at; /* block bytes; qs offset; qs dwords; m / qh offsets or -1 */
    int bs;                        /* values per block */
} x8_shape;

/* The 32-value types: qs dwords, d, m, qh (see the header). The K-quants (super-blocks of 256,
 * read by x86_dotk8.inc): every whole dword of the block in order (qs_at 0, nq = ts / 4), then
 * Q6_K's trailing fp16 d as a 16-bit field (d_at after them). */
static int x8_shape_of(int32_t type, x8_shape *s) {
    switch (type) {
    case LLK_Q4_0: case LLK_IQ4_NL: *s = (x8_shape){18, 2, 4, -1, -1, 32}; return 1;
    case LLK_Q4_1: *s = (x8_shape){20, 4, 4, 2, -1, 32}; return 1;
    case LLK_Q5_0: *s = (x8_shape){22, 6, 4, -1, 2, 32}; return 1;
    case LLK_Q5_1: *s = (x8_shape){24, 8, 4, 2, 4, 32}; return 1;
    case LLK_Q8_0: *s = (x8_shape){34, 2, 8, -1, -1, 32}; return 1;
    case LLK_Q4_K: *s = (x8_shape){144, 0, 36, -1, -1, 256}; return 1;
    case LLK_Q5_K: *s = (x8_shape){176, 0, 44, -1, -1, 256}; return 1;
    case LLK_Q6_K: *s = (x8_shape){210, 0, 52, -1, -1, 256}; return 1;
    default: return 0;
    }
}

/* Where a block's 16-bit d field sits in the GGUF block: 0, or Q6_K's 208 (after the dwords) */
static int d_src(const x8_shape *s) { return s->bs == 256 ? 4 * s->nq : 0; }
static int has_d(const x8_shape *s) { return s->bs == 32 || s->ts % 4; }

int llk_x8_type(int32_t type) {
    x8_shape s;
    return x8_shape_of(type, &s);
}

/* Offsets in a packed block of 8: d, m, qh (after the qs dwords). */
static void x8_fields(const x8_shape *s, int *d_at, int *m_at, int *h_at) {
    *d_at = 32 * s->nq;
    *m_at = *d_at + 16;
    *h_at = *m_at + (s->m_at >= 0 ? 16 : 0);
}

/* Rows src[j * stride] (j < nr; the rest repeat row nr - 1), nb blocks each, into one group. */
static void pack_group(const uint8_t *src, int64_t stride, int nr, int64_t nb, const x8_shape *s,
                       uint8_t *dst) {
    int d_at, m_at, h_at;
    x8_fields(s, &d_at, &m_at, &h_at);
    for (int j = 0; j < 8; j++) {
        const uint8_t *row = src + (j < nr ? j : nr - 1) * stride;
        uint8_t *o = dst;
        for (int64_t b = 0; b < nb; b++, row += s->ts, o += 8 * s->ts) {
            for (int t = 0; t < s->nq; t++) memcpy(o + 32 * t + 4 * j, row + s->qs_at + 4 * t, 4);
            if (has_d(s)) memcpy(o + d_at + 2 * j, row + d_src(s), 2);
            if (s->m_at >= 0) memcpy(o + m_at + 2 * j, row + s->m_at, 2);
            if (s->h_at >= 0) memcpy(o + h_at + 4 * j, row + s->h_at, 4);
        }
    }
}

void llk_x8_unpack_group(const uint8_t *grp, int32_t type, int64_t nb, uint8_t *rows) {
    x8_shape s;
    if (!x8_shape_of(type, &s)) return;
    int d_at, m_at, h_at;
    x8_fields(&s, &d_at, &m_at, &h_at);
    for (int j = 0; j < 8; j++) {
        uint8_t *row = rows + j * nb * s.ts;
        const uint8_t *g = grp;
        for (int64_t b = 0; b < nb; b++, row += s.ts, g += 8 * s.ts) {
            for (int t = 0; t < s.nq; t++) memcpy(row + s.qs_at + 4 * t, g + 32 * t + 4 * j, 4);
            if (has_d(&s)) memcpy(row + d_src(&s), g + d_at + 2 * j, 2);
            if (s.m_at >= 0) memcpy(row + s.m_at, g + m_at + 2 * j, 2);
            if (s.h_at >= 0) memcpy(row + s.h_at, g + h_at + 4 * j, 4);
        }
    }
}

static _Thread_local uint8_t *tl_rows;
static _Thread_local size_t tl_rows_cap;

void llk_x8_unpacked(llk_row_fn fn, int32_t type, const uint8_t *grp, int64_t rb, int nr,
                     const llk_act *a, int64_t m0, int rm, float *y, int64_t ldy) {
    if ((size_t)(8 * rb) > tl_rows_cap) {
        free(tl_rows);
        tl_rows = malloc((size_t)(8 * rb));
        tl_rows_cap = tl_rows ? (size_t)(8 * rb) : 0;
        if (!tl_rows) { /* no room for 8 rows: NaN outputs, which every reader checks for */
            for (int r = 0; r < rm; r++)
                for (int c = 0; c < nr; c++) y[(m0 + r) * ldy + c] = NAN;
            return;
        }
    }
    llk_x8_unpack_group(grp, type, a->k / llk_block_size(type), tl_rows);
    fn(tl_rows, rb, nr, a, m0, rm, y, ldy);
}

/* Drops the whole pages inside [a, b) of a read-only file mapping from the process; returns
 * where the next release may start (the end of the last page dropped, or a). */
static const uint8_t *release_pages(const uint8_t *a, const uint8_t *b) {
#if defined(__linux__) && defined(MADV_DONTNEED)
    const uintptr_t pg = (uintptr_t)sysconf(_SC_PAGESIZE);
    const uintptr_t lo = ((uintptr_t)a + pg - 1) & ~(pg - 1), hi = (uintptr_t)b & ~(pg - 1);
    if (hi > lo && madvise((void *)lo, hi - lo, MADV_DONTNEED) == 0) return (const uint8_t *)hi;
#else
    (void)b;
#endif
    return a;
}

void llk_drop_pages(const void *p, int64_t bytes) {
    if (bytes > 0) release_pages(p, (const uint8_t *)p + bytes);
}

#define CHUNK_BYTES (1 << 20) /* source bytes per chunk of work (and between releases) */

typedef struct {
    const uint8_t *in;
    uint8_t *out;
    int64_t stride, n, nb, rb, per; /* per: groups per chunk */
    const x8_shape *s;
    int release;
} pack_job;

static void pack_chunk(void *arg, int c) {
    const pack_job *J = arg;
    const int64_t g0 = (int64_t)c * J->per * 8;
    const int64_t g1 = g0 + J->per * 8 < J->n ? g0 + J->per * 8 : J->n;
    for (int64_t g = g0; g < g1; g += 8)
        pack_group(J->in + g * J->stride, J->stride, (int)(g1 - g < 8 ? g1 - g : 8), J->nb, J->s,
                   J->out + g * J->rb);
    if (J->release) release_pages(J->in + g0 * J->stride, J->in + g1 * J->stride);
}

int llk_pack_x8(const void *src, int64_t row_stride, int64_t n, int64_t k, int32_t type, void *dst,
                int32_t release) {
    x8_shape s;
    if (!x8_shape_of(type, &s)) return LLK_E_TYPE;
    if (k <= 0 || k % s.bs || n < 0) return LLK_E_SHAPE;
    const int64_t nb = k / s.bs, rb = nb * s.ts;
    if (n > 1 && row_stride < rb) return LLK_E_SHAPE;
    if (n == 0) return LLK_OK;
    int64_t per = CHUNK_BYTES / (8 * row_stride);
    per = per < 1 ? 1 : per;
    const int64_t chunks = ((n + 7) / 8 + per - 1) / per;
    if (chunks > INT32_MAX) return LLK_E_SHAPE;
    const pack_job J = {src, dst, row_stride, n, nb, rb, per, &s, release != 0};
    llk_run_locked(pack_chunk, (void *)&J, (int)chunks); /* chunks in order, by every thread */
    if (release) /* the pages two chunks share: neither released them */
        release_pages(src, (const uint8_t *)src + n * row_stride);
    return LLK_OK;
}
