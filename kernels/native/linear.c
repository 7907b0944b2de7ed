/* linear.c: a linear layer with its neighbours fused in, one native call instead of three:
 *
 *   h = x;  h = rms_norm(h) * norm_w        (prologue, optional)
 *           h = act(h[:, :F]) * h[:, F:]    (prologue, optional GLU over a [M, 2F] input)
 *   y = h @ W^T                              (llk_matmul, every weight type)
 *   y = rms_norm(y) * post_w                 (epilogue, optional)
 *   y = y + residual                         (epilogue, optional)
 *
 * Each step is the row op of rowops.c, row by row, so the fused call computes exactly what the
 * separate calls would (and stays batch-invariant). The prologue writes a thread-local buffer;
 * the epilogue works in place on y. Bytes per call: llk_matmul's plus M * (K + 2N) * 4.
 */
#include <stdlib.h>

#include "llk_internal.h"

static _Thread_local float *tl_h;
static _Thread_local size_t tl_cap;

int llk_linear(const float *x, int64_t m, int64_t k_in, int64_t ldx, const llk_fuse *f,
               const llk_part *parts, int32_t n_parts, float *y, int64_t ldy) {
    const int glu = f && f->glu >= 0;
    const int64_t k = glu ? k_in / 2 : k_in;
    if (m < 0 || k_in <= 0 || (glu && k_in % 2)) return LLK_E_SHAPE;
    const float *h = x;
    int64_t ldh = ldx;
    if (f && (f->norm_w || glu) && m > 0) {
        /* the norm's rows, then the GLU's in their own region: rows run in parallel, so the
         * GLU must not write over input rows another thread has yet to read */
        const size_t normed = f->norm_w ? (size_t)(m * k_in) : 0, need = normed + (glu ? (size_t)(m * k) : 0);
        if (need > tl_cap) {
            free(tl_h);
            tl_h = malloc(need * sizeof(float));
            tl_cap = tl_h ? need : 0;
            if (!tl_h) return LLK_E_NOMEM;
        }
        const float *src = x;
        int64_t lds = ldx;
        if (f->norm_w) {
            llk_rms_norm(src, m, k_in, lds, f->norm_w, f->norm_eps, tl_h, k_in);
            src = tl_h;
            lds = k_in;
        }
        if (glu) {
            const int rc = llk_glu(src, m, k, lds, f->glu, tl_h + normed, k);
            if (rc) return rc;
        }
        h = tl_h + (glu ? normed : 0);
        ldh = glu ? k : k_in;
    }
    const int rc = llk_matmul(h, m, k, ldh, parts, n_parts, y, ldy);
    if (rc || !f) return rc;
    int64_t n = 0;
    for (int32_t p = 0; p < n_parts; p++)
        if (parts[p].col + parts[p].n > n) n = parts[p].col + parts[p].n;
    if (f->post_w) llk_rms_norm(y, m, n, ldy, f->post_w, f->post_eps, y, ldy);
    if (f->residual)
        for (int64_t r = 0; r < m; r++) {
            float *yr = y + r * ldy;
            const float *rr = f->residual + r * f->ldr;
            for (int64_t i = 0; i < n; i++) yr[i] = rr[i] + yr[i];
        }
    return LLK_OK;
}
