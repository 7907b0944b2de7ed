/* block.c: a whole pre-norm decoder block in one native call (the llama and Gemma 3 blocks and
 * the NextN blocks built from them), for the few-row steps of decode and MTP verification:
 *
 *   qkv = rms_norm(x) @ Wqkv^T                       llk_linear (prologue norm)
 *   q, k = rope(norm_q(q)) * q_scale, rope(norm_k(k))  llk_rope in place (norms optional)
 *   o  = attention(q, cache + {k, v})                  llk_attend (writes k/v into their slots)
 *   x1 = x + post_norm(o @ Wo^T)                       llk_linear (epilogue norm optional)
 *   h  = rms_norm(x1) @ Wgu^T                          llk_linear
 *   y  = x1 + post_norm(glu(h) @ Wdown^T)              llk_linear (prologue GLU)
 *
 * Every step is the call the Python block makes one by one (core/models/llama.py, gemma3.py), on
 * the same buffers in the same order: the result is bit for bit the same, and as batch-invariant.
 * What it saves is the interpreter between the calls: a decode step makes one call per layer
 * instead of six, and each of those cost more than its arguments right after a streamed weight
 * matrix had evicted the interpreter's caches. Bytes and flops: the four linears' and the
 * attention's.
 */
#include "llk_internal.h"

int llk_block_run(const llk_block *b, int64_t m, const float *x, float *y, const float *cos_t,
                  const float *sin_t, const llk_kv_layer *kv, const int64_t *slots, int64_t n_read,
                  const int64_t *kpos, const int64_t *qpos, int64_t window, const uint8_t *mask) {
    if (m < 1 || m > b->m || kv->dv != b->dv || kv->hkv != b->hkv) return LLK_E_SHAPE;
    const int64_t ld = b->n_qkv, nq = b->hq * b->dk, nk = b->hkv * b->dk;
    float *qkv = b->qkv, *o = b->o, *x1 = b->x1, *h = b->h;
    llk_fuse f[4];
    for (int i = 0; i < 4; i++) f[i] = b->fuse[i];
    f[1].residual = x;
    f[1].ldr = b->n_embd;
    f[3].residual = x1;
    f[3].ldr = b->n_embd;
    int rc = llk_linear(x, m, b->n_embd, b->n_embd, &f[0], b->parts[0], b->n_parts[0], qkv, ld);
    if (rc) return rc;
    if (!b->q_norm && !b->k_norm && b->q_scale == 1.0f) { /* q and k heads in one call */
        rc = llk_rope(qkv, m, b->hq + b->hkv, b->dk, ld, b->n_rot, b->neox, cos_t, sin_t, NULL,
                      0.0f, 1.0f);
    } else {
        rc = llk_rope(qkv, m, b->hq, b->dk, ld, b->n_rot, b->neox, cos_t, sin_t, b->q_norm,
                      b->qk_eps, b->q_scale);
        if (!rc)
            rc = llk_rope(qkv + nq, m, b->hkv, b->dk, ld, b->n_rot, b->neox, cos_t, sin_t,
                          b->k_norm, b->qk_eps, 1.0f);
    }
    if (rc) return rc;
    rc = llk_attend(qkv, m, b->hq, b->dk, ld, qkv + nq, ld, qkv + nq + nk, ld, slots, kv->k,
                    kv->kt, kv->k_head_stride, kv->k_slot_stride, kv->v, kv->vt,
                    kv->v_head_stride, kv->v_slot_stride, kv->dv, kv->hkv, n_read, kpos, qpos,
                    window, mask, b->attn_scale, o);
    if (rc) return rc;
    const int64_t n_o = b->hq * b->dv;
    rc = llk_linear(o, m, n_o, n_o, &f[1], b->parts[1], b->n_parts[1], x1, b->n_embd);
    if (!rc) rc = llk_linear(x1, m, b->n_embd, b->n_embd, &f[2], b->parts[2], b->n_parts[2], h, b->n_gu);
    if (!rc) rc = llk_linear(h, m, b->n_gu, b->n_gu, &f[3], b->parts[3], b->n_parts[3], y, b->n_embd);
    return rc;
}

/* Blocks 0 .. n - 1 in one call: block l reads the previous one's output (tmp holds two [m,
 * n_embd] buffers in turn) and the last writes y; each block's K/V buffers are kvs[l], its step's
 * slots / positions / mask those of groups[group[l]], its RoPE table cos[rope[l]] / sin[rope[l]]. */
int llk_stack_run(const llk_block *const *blocks, const llk_kv_layer *const *kvs,
                  const int32_t *group, const int32_t *rope, int64_t n, int64_t m, const float *x,
                  float *y, float *tmp, const float *const *cos_t, const float *const *sin_t,
                  const llk_step_group *groups) {
    const float *in = x;
    for (int64_t l = 0; l < n; l++) {
        const llk_block *b = blocks[l];
        float *out = l == n - 1 ? y : tmp + (l & 1) * m * b->n_embd;
        const llk_step_group *g = &groups[group[l]];
        const int rc = llk_block_run(b, m, in, out, cos_t[rope[l]], sin_t[rope[l]], kvs[l],
                                     g->slots, g->n_read, g->kpos, g->qpos, g->window, g->mask);
        if (rc) return rc;
        in = out;
    }
    return LLK_OK;
}

/* A NextN draft step: the calls core/models/nextn.py makes one by one (embedding lookup, the two
 * input norms into the halves of one row, eh_proj, the block, the draft head on the rows that
 * draft), on buffers of the same values, so the same bits; one call instead of five. */
int llk_nextn_run(const llk_nextn *n, int64_t m, const int64_t *tokens, const float *h_prev,
                  float *y, int64_t n_z, const int64_t *z_rows, float *z, const float *cos_t,
                  const float *sin_t, const llk_kv_layer *kv, const int64_t *slots, int64_t n_read,
                  const int64_t *kpos, const int64_t *qpos, int64_t window, const uint8_t *mask) {
    const llk_block *b = n->block;
    const int64_t e = b->n_embd;
    if (m < 1 || m > b->m || n_z < 0 || n_z > m) return LLK_E_SHAPE;
    for (int64_t i = 0; i < n_z; i++)
        if (z_rows[i] < 0 || z_rows[i] >= m) return LLK_E_SHAPE;
    int rc = llk_embed_rows(n->embd_type, n->embd, n->embd_rows, n->embd_row_bytes, e, tokens, m,
                            n->embd_scale, n->e);
    if (!rc) rc = llk_rms_norm(n->e, m, e, e, n->enorm, n->eps, n->cat, 2 * e);
    if (!rc) rc = llk_rms_norm(h_prev, m, e, e, n->hnorm, n->eps, n->cat + e, 2 * e);
    if (!rc) rc = llk_matmul(n->cat, m, 2 * e, 2 * e, n->eh_parts, n->eh_n_parts, n->x0, e);
    if (!rc)
        rc = llk_block_run(b, m, n->x0, y, cos_t, sin_t, kv, slots, n_read, kpos, qpos, window,
                           mask);
    if (rc || n_z == 0) return rc;
    for (int64_t i = 0; i < n_z; i++)
        memcpy(n->zin + i * e, y + z_rows[i] * e, (size_t)e * sizeof(float));
    int64_t n_out = 0;
    for (int32_t p = 0; p < n->head_n_parts; p++)
        if (n->head_parts[p].col + n->head_parts[p].n > n_out)
            n_out = n->head_parts[p].col + n->head_parts[p].n;
    return llk_linear(n->zin, n_z, e, e, &n->head_fuse, n->head_parts, n->head_n_parts, z, n_out);
}
