/* stlmap.c: the iteration order of llama.cpp's token_to_id map (a libstdc++ std::unordered_map of
 * std::string), for core/tokenizer/stlmap.py, which holds the same replay in Python and says why
 * it matters (EOT / FIM detection keeps the first match in that order). Not a kernel: it is here
 * because this is the package's one native build. std::hash<std::string> is libstdc++'s
 * _Hash_bytes (seed 0xc70f6907); the bucket counts follow the caller's measured growth table, and
 * nodes are linked as _Hashtable links them for unique keys (insert at the front of a bucket's
 * run, a new bucket's node at the front of the list, _M_rehash_aux relinking in list order). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "llk.h"

static uint64_t shift_mix(uint64_t v) { return v ^ (v >> 47); }

static uint64_t stl_hash(const uint8_t *p, int64_t n) {
    const uint64_t mul = (0xC6A4A793ull << 32) + 0x5BD1E995ull;
    uint64_t h = 0xC70F6907ull ^ ((uint64_t)n * mul);
    const int64_t aligned = n & ~(int64_t)7;
    for (int64_t i = 0; i < aligned; i += 8) {
        uint64_t k = 0;
        for (int j = 7; j >= 0; j--) k = k << 8 | p[i + j]; /* little-endian load */
        k = shift_mix(k * mul) * mul;
        h = (h ^ k) * mul;
    }
    if (n & 7) {
        uint64_t k = 0;
        for (int64_t j = (n & 7) - 1; j >= 0; j--) k = k << 8 | p[aligned + j];
        h = (h ^ k) * mul;
    }
    return shift_mix(shift_mix(h) * mul);
}

#define NONE (-3)   /* an empty bucket */
#define BEFORE (-2) /* the bucket's run starts at the list head */

static int32_t relink(int32_t head, int32_t *nxt, const uint64_t *hash, int32_t *buckets,
                      int64_t count) {
    for (int64_t b = 0; b < count; b++) buckets[b] = NONE;
    int32_t new_head = -1;
    int64_t first_bucket = 0;
    for (int32_t node = head; node != -1;) {
        const int32_t following = nxt[node];
        const int64_t b = (int64_t)(hash[node] % (uint64_t)count);
        const int32_t before = buckets[b];
        if (before == NONE) {
            nxt[node] = new_head;
            new_head = node;
            buckets[b] = BEFORE;
            if (nxt[node] != -1) buckets[first_bucket] = node;
            first_bucket = b;
        } else if (before == BEFORE) {
            nxt[node] = new_head;
            new_head = node;
        } else {
            nxt[node] = nxt[before];
            nxt[before] = node;
        }
        node = following;
    }
    return new_head;
}

int64_t llk_stl_map_order(const char *texts, int64_t bytes, int64_t n, const int64_t (*growth)[2],
                          int32_t n_growth, int32_t *order) {
    if (n <= 0) return 0;
    if (n_growth < 1 || n > growth[n_growth - 1][1]) return LLK_E_SHAPE; /* beyond the table */
    int64_t most = 1; /* the bucket count n elements reach */
    for (int g = 0; g < n_growth && growth[g][0] <= n; g++) most = growth[g][1];
    uint64_t *hash = malloc((size_t)n * sizeof(uint64_t));
    int32_t *nxt = malloc((size_t)n * sizeof(int32_t));
    int32_t *buckets = malloc((size_t)most * sizeof(int32_t));
    int64_t i = 0, start = 0;
    if (hash && nxt && buckets)
        for (int64_t p = 0; p <= bytes && i < n; p++) { /* NUL-separated texts */
            if (p < bytes && texts[p] != '\0') continue;
            hash[i++] = stl_hash((const uint8_t *)texts + start, p - start);
            start = p + 1;
        }
    if (!hash || !nxt || !buckets || i != n) {
        free(hash), free(nxt), free(buckets);
        return !hash || !nxt || !buckets ? LLK_E_NOMEM : LLK_E_SHAPE;
    }
    int32_t head = -1;
    int64_t count = 1, g = 0;
    buckets[0] = NONE;
    for (int32_t k = 0; k < n; k++) {
        if (g < n_growth && k + 1 == growth[g][0]) {
            count = growth[g++][1];
            head = relink(head, nxt, hash, buckets, count);
        }
        const int64_t b = (int64_t)(hash[k] % (uint64_t)count);
        const int32_t before = buckets[b];
        if (before == BEFORE) {
            nxt[k] = head;
            head = k;
        } else if (before != NONE) { /* at the front of its bucket's run */
            nxt[k] = nxt[before];
            nxt[before] = k;
        } else { /* a new bucket: the node goes to the very front of the list */
            nxt[k] = head;
            head = k;
            if (nxt[k] != -1) buckets[(int64_t)(hash[nxt[k]] % (uint64_t)count)] = k;
            buckets[b] = BEFORE;
        }
    }
    int64_t m = 0;
    for (int32_t node = head; node != -1; node = nxt[node]) order[m++] = node;
    free(hash), free(nxt), free(buckets);
    return m;
}
