/* llk.h: the C ABI of llmkit's native CPU matmul on GGUF weight blocks (loaded with ctypes).
 *
 * Computes Y[M, N] = X[M, K] @ W[N, K]^T where W is stored exactly as in the GGUF file (the mmap'd
 * bytes, any block type listed below) and X is fp32. As in llama.cpp, X is first rounded to the
 * weight type's activation format (q8_0 / q8_1 / q8_K blocks, fp16, bf16 or fp32) and every block
 * dot product is exact in int32 before the fp32 accumulation across blocks.
 *
 * Guarantee: Y[m, n] is bit-identical whatever M is, whatever the thread count and whichever other
 * rows share the call, for a fixed instruction-set path (llk_get_isa).
 */
#ifndef LLK_H
#define LLK_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define LLK_API __declspec(dllexport)
#else
#define LLK_API __attribute__((visibility("default")))
#endif

/* Weight types: ggml's type ids. */
enum {
    LLK_F32 = 0,
    LLK_F16 = 1,
    LLK_Q4_0 = 2,
    LLK_Q4_1 = 3,
    LLK_Q5_0 = 6,
    LLK_Q5_1 = 7,
    LLK_Q8_0 = 8,
    LLK_Q2_K = 10,
    LLK_Q3_K = 11,
    LLK_Q4_K = 12,
    LLK_Q5_K = 13,
    LLK_Q6_K = 14,
    LLK_IQ4_NL = 20,
    LLK_IQ4_XS = 23,
    LLK_BF16 = 30,
};

/* Instruction-set paths. Each one is batch-invariant on its own; they may differ from each other
 * in the last bits of the fp32 sums (the two x86 paths happen to agree bit for bit). */
enum {
    LLK_ISA_SCALAR = 0,
    LLK_ISA_AVX2 = 1,        /* x86-64 AVX2 + FMA + F16C */
    LLK_ISA_AVX512_VNNI = 2, /* x86-64 AVX-512 F/BW/VL + VNNI */
    LLK_ISA_NEON_DOTPROD = 3, /* aarch64 NEON + dotprod */
    LLK_ISA_COUNT = 4,
};

/* Error codes (negative returns). */
enum {
    LLK_OK = 0,
    LLK_E_TYPE = -1,  /* unsupported weight type */
    LLK_E_SHAPE = -2, /* K not a multiple of the type's block size, or bad sizes */
    LLK_E_NOMEM = -3, /* scratch allocation failed */
    LLK_E_ISA = -4,   /* ISA not compiled in or not supported by this CPU */
};

/* One weight matrix of a (possibly fused) linear layer: rows n of `type`, each `row_stride` bytes
 * apart (>= the row's size: a row slice of a bigger buffer is fine), written to output columns
 * [col, col + n). `layout`: LLK_LAYOUT_ROWS (the GGUF rows) or LLK_LAYOUT_X8 (llk_pack_x8's
 * groups; row_stride = the row's size). Layout is part of the ABI (mirrored by ctypes in
 * cpu_native.py). */
typedef struct {
    const void *w;
    int64_t row_stride;
    int64_t n;
    int64_t col;
    int32_t type;
    int32_t layout;
} llk_part;

enum { LLK_LAYOUT_ROWS = 0, LLK_LAYOUT_X8 = 1 };

/* x8 groups (pack.c): the rows of Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 IQ4_NL Q4_K Q5_K Q6_K regrouped so
 * that a kernel reads each group of 8 rows as one stream, already in its vector lanes: per group
 * (the last one padded by repeating its last row) and block, 8 x the block's bytes = dwords t
 * of the 8 rows (32 bytes per t: the 32-value types' qs, the K-quants' whole dwords), then their
 * 16-bit d (and for Q4_1 / Q5_1 m, for Q5_0 / Q5_1 the u32 qh). Same size as the rows (plus
 * the padding): ceil(n / 8) * 8 * row bytes at dst.
 * The values and every result computed from them are unchanged. `release`: src is a read-only
 * file mapping; drop its whole pages from the process as they are packed (madvise DONTNEED: they
 * read back from the file if touched again), so packing a mapped matrix never holds both copies.
 * LLK_E_TYPE for other types, LLK_E_SHAPE for bad sizes. */
LLK_API int llk_pack_x8(const void *src, int64_t row_stride, int64_t n, int64_t k, int32_t type,
                        void *dst, int32_t release);

/* Drops the whole pages inside [p, p + bytes) of a read-only file mapping from the process (they
 * read back from the file if touched again): after a one-time read of mapped weights. */
LLK_API void llk_drop_pages(const void *p, int64_t bytes);

/* 1 when the selected ISA path reads `type` in x8 groups natively (x86 AVX2 / AVX-512); other
 * paths read them too, by unpacking each group first (slower: pack only where this says 1). */
LLK_API int llk_x8_native(int32_t type);

/* y[m, parts[i].col + j] = x[m, :] . row j of part i, for m < M. x rows are `ldx` floats apart, y
 * rows `ldy` floats apart. Returns LLK_OK or an error code (nothing is written on error). */
LLK_API int llk_matmul(const float *x, int64_t m, int64_t k, int64_t ldx, const llk_part *parts,
                       int32_t n_parts, float *y, int64_t ldy);

/* Block size (elements) and block bytes of a type; 0 if unsupported. */
LLK_API int llk_block_size(int32_t type);
LLK_API int llk_type_size(int32_t type);

/* Threads: the caller plus n - 1 persistent workers. Workers spin `spin_us` microseconds for the
 * next call before sleeping. */
LLK_API int llk_set_threads(int n);
LLK_API int llk_get_threads(void);
LLK_API void llk_set_spin_us(int us);

/* The path used by llk_matmul; llk_best_isa is what this CPU supports best. */
LLK_API int llk_get_isa(void);
LLK_API int llk_best_isa(void);
LLK_API int llk_isa_supported(int isa);
LLK_API int llk_set_isa(int isa);
LLK_API const char *llk_isa_name(int isa);

/* Benchmark helper: reads `bytes` at p with every thread (one contiguous slice each) and returns
 * a checksum; time it for the machine's read bandwidth. */
LLK_API uint64_t llk_read_probe(const void *p, int64_t bytes);

/* Benchmark helper: `reps` llk_matmul calls back to back, call r on the weight set r % n_sets
 * (set s: parts[s * n_parts .. + n_parts), e.g. copies of one matrix that together overflow the
 * caches); ns[r] = call r's wall time. The kernels' cost without any caller's (ctypes, Python)
 * between the calls, as a decode step's single native call makes them. */
LLK_API int llk_matmul_timed(const float *x, int64_t m, int64_t k, const llk_part *parts,
                             int32_t n_parts, int32_t n_sets, float *y, int64_t ldy, int32_t reps,
                             int64_t *ns);

/* Test hooks: one row of activation quantization with the current ISA path.
 * q8_0/q8_1: k % 32 == 0; qs[k], d[k/32], s[k/32] (d, s: the fp16-rounded values as fp32),
 * isum[k/32] (exact sums of q). q8_K: k % 256 == 0; qs[k], d[k/256] (fp32), bsums[k/16]. */
LLK_API int llk_quantize_q8_1(const float *x, int64_t k, int8_t *qs, float *d, float *s,
                              int32_t *isum);
LLK_API int llk_quantize_q8_K(const float *x, int64_t k, int8_t *qs, float *d, int16_t *bsums);

/* Weight quantization (quantize_k.c), byte-identical to llmkit.quant's torch reference (and so to
 * llama.cpp's quantize_row_*_ref / _impl): nrows rows of n_per_row fp32 values (a multiple of the
 * type's block size) -> nrows * n_per_row / block blocks at out. qw: NULL, or n_per_row importance
 * weights (the imatrix column weights) used for every row. Types: Q2_K Q3_K Q4_K Q5_K Q6_K IQ4_NL
 * IQ4_XS, and (quantize_legacy.c) Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 with qw NULL (LLK_E_TYPE otherwise;
 * Q8_0 ignores qw). Blocks are split over the thread pool; the bytes never depend on the thread
 * count. */
LLK_API int llk_quantize(int32_t type, const float *x, int64_t nrows, int64_t n_per_row,
                         const float *qw, void *out);

/* ---- the rest of a decoder layer (rowops.c, attention.c, linear.c) ----
 * Row ops work row by row in a fixed order: a row's result never depends on the other rows. */

/* y = x / sqrt(mean(x^2) + eps) * w (w may be NULL); m rows of n, strides in floats. */
LLK_API int llk_rms_norm(const float *x, int64_t m, int64_t n, int64_t ldx, const float *w,
                         float eps, float *y, int64_t ldy);
/* In place on x [T, H, D] (token stride ldx floats, head stride D): optional per-head RMSNorm
 * (norm_w, eps), rotation of the first n_rot dims (neox: halves, else adjacent pairs) by cos/sin
 * [T, n_rot / 2], then a scale. */
LLK_API int llk_rope(float *x, int64_t t, int64_t h, int64_t d, int64_t ldx, int64_t n_rot,
                     int32_t neox, const float *cos_t, const float *sin_t, const float *norm_w,
                     float eps, float scale);
/* y[m, :f] = act(gu[m, :f]) * gu[m, f:2f]; act 0 = silu, 1 = tanh-GELU, 2 = tanh-GELU through
 * llama.cpp's fp16 table (rowops.c). */
LLK_API int llk_glu(const float *gu, int64_t m, int64_t f, int64_t ldg, int32_t act, float *y,
                    int64_t ldy);
/* The index of the first maximum of x[0, n), or of its first NaN (torch.argmax's choice); -1
 * when n <= 0. */
LLK_API int64_t llk_argmax(const float *x, int64_t n);
/* llk_argmax, and *prob = that value's softmax probability (0 for a NaN / inf maximum). */
LLK_API int64_t llk_argmax_prob(const float *x, int64_t n, float *prob);
/* 1 when x[0, n) holds no NaN and no infinity, else 0. */
LLK_API int llk_all_finite(const float *x, int64_t n);
/* y[i, :k] = row ids[i] (< n_rows; rows row_bytes apart) of a weight of `type` decoded to fp32 as
 * quant/dequant.py decodes it, times `scale` unless it is 0 (the embedding lookup). */
LLK_API int llk_embed_rows(int32_t type, const void *w, int64_t n_rows, int64_t row_bytes,
                           int64_t k, const int64_t *ids, int64_t t, float scale, float *y);
/* Rows x [T, H, D] into cache slots: cache + h * head_stride + slots[t] * slot_stride (bytes),
 * as F32, F16, BF16, Q8_0 or Q4_0 (ggml's reference quantizers). */
LLK_API int llk_kv_store(const float *x, int64_t t, int64_t h, int64_t d, int64_t ldx,
                         const int64_t *slots, void *cache, int32_t type, int64_t head_stride,
                         int64_t slot_stride);
/* out[t, h * dv ...] = softmax(scale * q . K) V over the slots visible to query t: slot i of S
 * (physical slot slot_idx[i], or i when slot_idx is NULL) is visible when mask[t * S + i] != 0,
 * or, without a mask, when 0 <= kpos[i] <= qpos[t] and qpos[t] - kpos[i] < window (window > 0).
 * K/V: F32, F16, BF16, Q8_0 or Q4_0, head and slot strides in bytes. GQA: head h reads kv head
 * h / (hq / hkv). A query that sees no slot gets zeros. */
LLK_API int llk_attention(const float *q, int64_t t, int64_t hq, int64_t dk, int64_t ldq,
                          const void *k, int32_t kt, int64_t k_head_stride, int64_t k_slot_stride,
                          const void *v, int32_t vt, int64_t v_head_stride, int64_t v_slot_stride,
                          int64_t dv, int64_t hkv, int64_t s, const int64_t *slot_idx,
                          const int64_t *kpos, const int64_t *qpos, int64_t window,
                          const uint8_t *mask, float scale, float *out, int64_t ldo);

/* A layer's attention step on a contiguous cache: write this batch's rows k_new [T, hkv, dk] and
 * v_new [T, hkv, dv] (heads contiguous, rows ldk / ldv floats apart) into `slots`, then
 * llk_attention over the first S slots (q [T, hq, dk], rows ldq floats apart: e.g. views of one
 * q|k|v projection; out [T, hq * dv] contiguous). One call per layer and step. */
LLK_API int llk_attend(const float *q, int64_t t, int64_t hq, int64_t dk, int64_t ldq,
                       const float *k_new, int64_t ldk, const float *v_new, int64_t ldv,
                       const int64_t *slots, void *k, int32_t kt, int64_t k_head_stride,
                       int64_t k_slot_stride, void *v, int32_t vt, int64_t v_head_stride,
                       int64_t v_slot_stride, int64_t dv, int64_t hkv, int64_t s,
                       const int64_t *kpos, const int64_t *qpos, int64_t window,
                       const uint8_t *mask, float scale, float *out);

/* What llk_linear fuses around the matmul (NULL / -1: nothing). Layout is part of the ABI. */
typedef struct {
    const float *norm_w; /* prologue: rms_norm(x) * norm_w */
    float norm_eps;
    int32_t glu;          /* prologue: -1 none, 0 silu, 1 tanh-GELU, 2 llama.cpp's fp16-table tanh-GELU, over a [M, 2K] input */
    const float *post_w;  /* epilogue: rms_norm(y) * post_w */
    float post_eps;
    int32_t reserved;
    const float *residual; /* epilogue: y = residual + y, rows ldr floats apart */
    int64_t ldr;
} llk_fuse;

/* llk_matmul with the fused prologue and epilogue above; k_in = K (2K with a GLU). */
LLK_API int llk_linear(const float *x, int64_t m, int64_t k_in, int64_t ldx, const llk_fuse *f,
                       const llk_part *parts, int32_t n_parts, float *y, int64_t ldy);

/* One layer's KV cache buffers (contiguous [hkv, slots, d] per head, as llk_attend reads them). */
typedef struct {
    void *k;
    int64_t k_head_stride, k_slot_stride; /* bytes */
    void *v;
    int64_t v_head_stride, v_slot_stride;
    int64_t dv, hkv;
    int32_t kt, vt; /* LLK_F32 / F16 / BF16 / Q8_0 / Q4_0 */
} llk_kv_layer;

/* A pre-norm decoder block bound to its weights and to step buffers of up to m rows (block.c).
 * Linears: 0 = q|k|v (fuse: input norm), 1 = output (post-norm optional), 2 = gate|up (input
 * norm), 3 = down (GLU, post-norm optional); the residual pointers of 1 and 3 are set per call.
 * Layout is part of the ABI (mirrored by ctypes in kernels/cpu_ops.py). */
typedef struct {
    const llk_part *parts[4];
    int32_t n_parts[4];
    llk_fuse fuse[4];
    int64_t n_embd, n_qkv, n_gu, m;
    int64_t hq, hkv, dk, dv, n_rot;
    int32_t neox, reserved;
    const float *q_norm, *k_norm; /* per-head RMSNorm before RoPE, or NULL */
    float qk_eps, q_scale, attn_scale, reserved2;
    float *qkv, *o, *x1, *h; /* [m, n_qkv], [m, hq * dv], [m, n_embd], [m, n_gu] */
} llk_block;

/* y [m, n_embd] = the block over rows x (contiguous; y must not alias x): its linears, RoPE from
 * cos/sin [m, n_rot / 2], and attention over the layer's cache `kv` (this step's k/v written into
 * `slots`; S = n_read slots read, masked as llk_attend masks). */
LLK_API int llk_block_run(const llk_block *b, int64_t m, const float *x, float *y,
                          const float *cos_t, const float *sin_t, const llk_kv_layer *kv,
                          const int64_t *slots, int64_t n_read, const int64_t *kpos,
                          const int64_t *qpos, int64_t window, const uint8_t *mask);

/* One step's attention inputs for the layers of one cache group (same slots and positions). */
typedef struct {
    const int64_t *slots, *kpos, *qpos;
    int64_t n_read, window;
    const uint8_t *mask;
} llk_step_group;

/* llk_block_run over blocks 0 .. n - 1 in turn (block.c): x -> y [m, n_embd] through tmp [2, m,
 * n_embd]; block l with kvs[l], groups[group[l]] and the RoPE table cos/sin[rope[l]]. */
LLK_API int llk_stack_run(const llk_block *const *blocks, const llk_kv_layer *const *kvs,
                          const int32_t *group, const int32_t *rope, int64_t n, int64_t m,
                          const float *x, float *y, float *tmp, const float *const *cos_t,
                          const float *const *sin_t, const llk_step_group *groups);

/* A NextN (MTP) head's draft step bound to its weights and to buffers of up to `m` rows (block.c):
 * the token embedding (any weight type, times embd_scale unless 0), the input norms and eh_proj,
 * the head's decoder block, and the draft head with its input norm (fuse). Layout is part of the
 * ABI (mirrored by ctypes in kernels/cpu_block.py). */
typedef struct {
    const void *embd;
    int64_t embd_rows, embd_row_bytes;
    int32_t embd_type, eh_n_parts;
    float embd_scale, eps;
    const float *enorm, *hnorm;
    const llk_part *eh_parts;
    const llk_block *block;
    const llk_part *head_parts;
    int32_t head_n_parts, reserved;
    llk_fuse head_fuse;
    float *e, *cat, *x0, *zin; /* [m, n_embd], [m, 2 n_embd], [m, n_embd], [m, n_embd] */
} llk_nextn;

/* y [m, n_embd] = the head's block over x0 = eh_proj [rms(embd[tokens]) * enorm | rms(h_prev) *
 * hnorm] (h_prev [m, n_embd] contiguous), and z [n_z, head rows] = the draft head over the norm
 * of rows z_rows of y; the block's arguments as llk_block_run's. */
LLK_API int llk_nextn_run(const llk_nextn *n, int64_t m, const int64_t *tokens,
                          const float *h_prev, float *y, int64_t n_z, const int64_t *z_rows,
                          float *z, const float *cos_t, const float *sin_t,
                          const llk_kv_layer *kv, const int64_t *slots, int64_t n_read,
                          const int64_t *kpos, const int64_t *qpos, int64_t window,
                          const uint8_t *mask);

/* SPM tokenization (spm.c, for core/tokenizer/spm.py): llama.cpp's llm_tokenizer_spm. A
 * vocabulary of n tokens: their UTF-8 texts NUL-separated in texts[0, bytes), their scores. */
typedef struct llk_spm llk_spm;
LLK_API llk_spm *llk_spm_new(const char *texts, int64_t bytes, int64_t n, const float *scores);
LLK_API void llk_spm_free(llk_spm *s);
/* The token ids of text[0, len) into out (cap >= len): their count, or LLK_E_TYPE when a byte
 * that must fall back to byte_ids[byte] has none (-1; *bad_byte = the byte), LLK_E_NOMEM. */
LLK_API int64_t llk_spm_encode(const llk_spm *s, const char *text, int64_t len,
                               const int32_t *byte_ids, int32_t *out, int64_t cap,
                               int32_t *bad_byte);

/* The order in which a libstdc++ std::unordered_map<std::string, ...> filled with the n
 * NUL-separated texts (in order) iterates them (stlmap.c), its bucket counts from growth[g] =
 * (element count that triggers a rehash, new bucket count): order[0, n) = indices; n, or
 * LLK_E_SHAPE beyond the table, LLK_E_NOMEM. */
LLK_API int64_t llk_stl_map_order(const char *texts, int64_t bytes, int64_t n,
                                  const int64_t (*growth)[2], int32_t n_growth, int32_t *order);

#ifdef __cplusplus
}
#endif

#endif
