/* spm.c: llama.cpp's SPM tokenization (llm_tokenizer_spm) of one raw text fragment, for
 * core/tokenizer/spm.py. It lives in this library because it is the package's one native build;
 * nothing here is a kernel.
 *
 * Split the UTF-8 text into characters (llama.cpp's utf8_len on the lead byte, clipped to the
 * text); put every adjacent pair whose concatenation is a vocabulary token into a priority queue
 * (highest token score first, ties: the leftmost pair); pop, skip pairs a merge has changed, merge,
 * queue the merged symbol's new pairs; repeat. A symbol that is a token becomes its id; any other
 * (a character outside the vocabulary: merges only ever form tokens) becomes the byte tokens of
 * its bytes. The token -> id map is an open-addressing hash over one blob of the token texts; a
 * repeated text keeps its last id (llama.cpp's map assignment). Memory: the blob, 8 bytes of
 * offset and 4 of score per token and 4 bytes per table slot (2x the tokens, rounded up to a
 * power of two): ~8 MB for Gemma 3's 262k tokens, where the sentencepiece model took ~45 MB.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "llk.h"

struct llk_spm {
    char *blob;      /* token texts back to back */
    int64_t *off;    /* [n + 1]: token i is blob[off[i], off[i + 1] - 1) (a NUL follows each) */
    float *score;    /* [n] */
    int32_t *table;  /* token ids, -1 = empty */
    uint64_t mask;   /* table size - 1 */
    int64_t n;
};

static uint64_t hash_bytes(const uint8_t *p, int64_t n) { /* FNV-1a, 64 bit */
    uint64_t h = 1469598103934665603ull;
    for (int64_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

/* The table slot of text p[0, n): the slot holding it, or the empty slot where it would go. */
static uint64_t slot_of(const llk_spm *s, const char *p, int64_t n) {
    for (uint64_t h = hash_bytes((const uint8_t *)p, n) & s->mask;; h = (h + 1) & s->mask) {
        const int32_t id = s->table[h];
        if (id < 0 || (s->off[id + 1] - s->off[id] - 1 == n &&
                       !memcmp(s->blob + s->off[id], p, (size_t)n)))
            return h;
    }
}

static int32_t find(const llk_spm *s, const char *p, int64_t n) { return s->table[slot_of(s, p, n)]; }

void llk_spm_free(llk_spm *s) {
    if (!s) return;
    free(s->blob);
    free(s->off);
    free(s->score);
    free(s->table);
    free(s);
}

llk_spm *llk_spm_new(const char *texts, int64_t bytes, int64_t n, const float *scores) {
    if (n <= 0 || n > INT32_MAX / 2 || bytes < n - 1) return NULL;
    llk_spm *s = calloc(1, sizeof(*s));
    if (!s) return NULL;
    uint64_t size = 16;
    while (size < 2 * (uint64_t)n) size <<= 1;
    s->n = n;
    s->mask = size - 1;
    s->blob = malloc((size_t)bytes + 1);
    s->off = malloc((size_t)(n + 1) * sizeof(int64_t));
    s->score = malloc((size_t)n * sizeof(float));
    s->table = malloc((size_t)size * sizeof(int32_t));
    if (!s->blob || !s->off || !s->score || !s->table) {
        llk_spm_free(s);
        return NULL;
    }
    memcpy(s->blob, texts, (size_t)bytes);
    memcpy(s->score, scores, (size_t)n * sizeof(float));
    memset(s->table, 0xFF, (size_t)size * sizeof(int32_t));
    int64_t i = 0, start = 0;
    for (int64_t p = 0; p <= bytes && i < n; p++) { /* texts are NUL-separated */
        if (p < bytes && texts[p] != '\0') continue;
        s->off[i] = start;
        s->off[i + 1] = p + 1;
        s->table[slot_of(s, texts + start, p - start)] = (int32_t)i; /* a repeat: the last id */
        start = p + 1;
        i++;
    }
    if (i != n) { /* fewer texts than n */
        llk_spm_free(s);
        return NULL;
    }
    return s;
}

typedef struct {
    float score;
    int32_t left, right, size;
} bigram_t;

/* heap order: higher score first, then the leftmost pair (llama.cpp's llm_bigram_spm) */
static int before(const bigram_t *a, const bigram_t *b) {
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

typedef struct {
    bigram_t *v;
    int64_t n, cap;
} heap_t;

static int heap_push(heap_t *h, bigram_t b) {
    if (h->n == h->cap) {
        const int64_t cap = h->cap ? 2 * h->cap : 64;
        bigram_t *v = realloc(h->v, (size_t)cap * sizeof(bigram_t));
        if (!v) return 0;
        h->v = v;
        h->cap = cap;
    }
    int64_t i = h->n++;
    while (i > 0 && before(&b, &h->v[(i - 1) / 2])) {
        h->v[i] = h->v[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    h->v[i] = b;
    return 1;
}

static bigram_t heap_pop(heap_t *h) {
    const bigram_t top = h->v[0], last = h->v[--h->n];
    int64_t i = 0;
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= h->n) break;
        if (c + 1 < h->n && before(&h->v[c + 1], &h->v[c])) c++;
        if (!before(&h->v[c], &last)) break;
        h->v[i] = h->v[c];
        i = c;
    }
    if (h->n) h->v[i] = last;
    return top;
}

typedef struct {
    int32_t start, size, prev, next; /* byte span of the text; size 0: merged away */
} symbol_t;

static int add_pair(const llk_spm *s, const char *text, const symbol_t *sym, heap_t *h,
                    int32_t left, int32_t right) {
    if (left < 0 || right < 0) return 1;
    const int32_t n = sym[left].size + sym[right].size;
    const int32_t id = find(s, text + sym[left].start, n);
    if (id < 0) return 1;
    return heap_push(h, (bigram_t){s->score[id], left, right, n});
}

int64_t llk_spm_encode(const llk_spm *s, const char *text, int64_t len, const int32_t *byte_ids,
                       int32_t *out, int64_t cap, int32_t *bad_byte) {
    static const uint8_t utf8_len[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
    if (len < 0 || len > INT32_MAX || cap < len) return LLK_E_SHAPE;
    if (len == 0) return 0;
    symbol_t *sym = malloc((size_t)len * sizeof(symbol_t));
    heap_t h = {0};
    if (!sym) return LLK_E_NOMEM;
    int32_t n = 0;
    for (int32_t p = 0; p < len; n++) {
        int32_t l = utf8_len[(uint8_t)text[p] >> 4];
        l = l < len - p ? l : (int32_t)(len - p);
        sym[n] = (symbol_t){p, l, n - 1, -1};
        if (n) sym[n - 1].next = n;
        p += l;
    }
    int ok = 1;
    for (int32_t i = 1; i < n && ok; i++) ok = add_pair(s, text, sym, &h, i - 1, i);
    while (ok && h.n) {
        const bigram_t b = heap_pop(&h);
        symbol_t *l = &sym[b.left], *r = &sym[b.right];
        if (!l->size || !r->size || l->size + r->size != b.size) continue; /* changed by a merge */
        l->size += r->size;
        r->size = 0;
        l->next = r->next;
        if (r->next >= 0) sym[r->next].prev = b.left;
        ok = add_pair(s, text, sym, &h, l->prev, b.left) && add_pair(s, text, sym, &h, b.left, l->next);
    }
    int64_t m = 0;
    for (int32_t i = 0; ok && i >= 0; i = sym[i].next) {
        const int32_t id = find(s, text + sym[i].start, sym[i].size);
        if (id >= 0) {
            out[m++] = id;
            continue;
        }
        for (int32_t k = 0; k < sym[i].size; k++) { /* byte fallback */
            const uint8_t byte = (uint8_t)text[sym[i].start + k];
            if (byte_ids[byte] < 0) {
                *bad_byte = byte;
                free(sym);
                free(h.v);
                return LLK_E_TYPE;
            }
            out[m++] = byte_ids[byte];
        }
    }
    free(sym);
    free(h.v);
    return ok ? m : LLK_E_NOMEM;
}
