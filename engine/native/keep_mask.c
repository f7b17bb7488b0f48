/* Dropout keep masks from a counter-based generator, for engine/native_masks.py.
 *
 * Threefry-2x32 with 20 rounds (Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy
 * as 1, 2, 3", SC'11; the generator behind JAX's PRNG keys): block b of a stream under the 64-bit
 * key k is Threefry(counter = (b mod 2^32, b / 2^32), key = (k mod 2^32, k / 2^32)), two 32-bit
 * words, i.e. four 16-bit lanes: lane 4b + m is bits 16 * (m % 2) .. 16 * (m % 2) + 15 of word m / 2
 * of block b. Element i of a mask is kept when lane i >= dropped, where
 * dropped = round(p * 65536): exactly that many of the 65536 lane values are dropped.
 *
 * Plain C: WIDTH blocks are computed side by side so that the rounds (32-bit adds, rotations and
 * xors) vectorise; target_clones picks AVX-512, AVX2 or generic code when the library loads. A mask
 * is cut into runs of whole chunks, one per thread of an OpenMP team (team.h): the lanes depend on
 * the element's index only, so the mask is the same for any number of threads. The engine compiles
 * this file with the system C compiler on first use.
 */
#include <stdint.h>

#include "clones.h"
#include "team.h"

#define WIDTH 64

static inline uint32_t rotl(uint32_t x, int r) { return (x << r) | (x >> (32 - r)); }

#define ROUND(r)                                                                                   \
    for (int j = 0; j < WIDTH; j++) {                                                              \
        x0[j] += x1[j];                                                                            \
        x1[j] = rotl(x1[j], r) ^ x0[j];                                                            \
    }
#define INJECT(s)                                                                                  \
    for (int j = 0; j < WIDTH; j++) {                                                              \
        x0[j] += ks[(s) % 3];                                                                      \
        x1[j] += ks[((s) + 1) % 3] + (uint32_t)(s);                                                \
    }

/* Blocks first .. first + count - 1 (count <= WIDTH) into words[2 * j], words[2 * j + 1]: lane
   4 * j + m of the stream is bits 16 * (m % 2) .. of words[2 * j + m / 2]. */
CLONES
static void threefry_blocks(uint32_t *words, uint64_t first, int count, uint32_t k0, uint32_t k1) {
    const uint32_t ks[3] = {k0, k1, 0x1BD11BDAu ^ k0 ^ k1};
    uint32_t x0[WIDTH], x1[WIDTH];
    for (int j = 0; j < WIDTH; j++) {
        uint64_t block = first + (uint64_t)j;
        x0[j] = (uint32_t)block + ks[0];
        x1[j] = (uint32_t)(block >> 32) + ks[1];
    }
    ROUND(13) ROUND(15) ROUND(26) ROUND(6) INJECT(1)
    ROUND(17) ROUND(29) ROUND(16) ROUND(24) INJECT(2)
    ROUND(13) ROUND(15) ROUND(26) ROUND(6) INJECT(3)
    ROUND(17) ROUND(29) ROUND(16) ROUND(24) INJECT(4)
    ROUND(13) ROUND(15) ROUND(26) ROUND(6) INJECT(5)
    for (int j = 0; j < count; j++) {
        words[2 * j] = x0[j];
        words[2 * j + 1] = x1[j];
    }
}

/* out[i] = one where lane offset + i >= dropped, else 0 (offset: a multiple of 4): a chunk of WIDTH
   blocks (4 * WIDTH lanes) at a time, so the lanes never leave the cache. T: uint16_t for bf16 / fp16
   bit patterns, uint32_t for fp32. */
#define KEEP_MASK(name, T)                                                                         \
    CLONES static void name(T *out, int64_t n, int64_t offset, uint32_t k0, uint32_t k1, uint32_t dropped, \
                            T one) {                                                                   \
        uint32_t words[2 * WIDTH];                                                                 \
        for (int64_t start = 0; start < n; start += 4 * WIDTH) {                                    \
            int64_t count = n - start < 4 * WIDTH ? n - start : 4 * WIDTH;                           \
            threefry_blocks(words, (uint64_t)(offset + start) / 4, WIDTH, k0, k1);                 \
            T *o = out + start;                                                                    \
            if (count == 4 * WIDTH) {                                                              \
                for (int w = 0; w < 2 * WIDTH; w++) {                                              \
                    o[2 * w] = (words[w] & 0xFFFFu) >= dropped ? one : 0;                          \
                    o[2 * w + 1] = (words[w] >> 16) >= dropped ? one : 0;                          \
                }                                                                                  \
            } else {                                                                               \
                for (int64_t i = 0; i < count; i++)                                                \
                    o[i] = ((words[i / 2] >> (16 * (i % 2))) & 0xFFFFu) >= dropped ? one : 0;      \
            }                                                                                      \
        }                                                                                          \
    }
KEEP_MASK(keep16, uint16_t)
KEEP_MASK(keep32, uint32_t)

/* The same mask as bits: bit i % 8 of byte i / 8 is set where lane offset + i >= dropped (offset: a
   multiple of 4 * WIDTH, so that out starts on a byte). */
CLONES static void keep_bits(uint8_t *out, int64_t n, int64_t offset, uint32_t k0, uint32_t k1, uint32_t dropped) {
    uint32_t words[2 * WIDTH];
    for (int64_t start = 0; start < n; start += 4 * WIDTH) {
        int64_t count = n - start < 4 * WIDTH ? n - start : 4 * WIDTH;
        threefry_blocks(words, (uint64_t)(offset + start) / 4, WIDTH, k0, k1);
        uint8_t *o = out + start / 8;
        for (int64_t byte = 0; byte < (count + 7) / 8; byte++) {
            unsigned bits = 0;
            for (int m = 0; m < 8 && 8 * byte + m < count; m++) {
                const int64_t i = 8 * byte + m;
                bits |= (unsigned)(((words[i / 2] >> (16 * (i % 2))) & 0xFFFFu) >= dropped) << m;
            }
            o[byte] = (uint8_t)bits;
        }
    }
}

/* The keep mask of n elements under key on up to `threads` threads: bits 16 writes uint16
   patterns, 32 writes uint32 ones, 1 packed bits (keep_bits; `one` unused). Each thread takes a
   run of whole chunks (4 * WIDTH lanes), so every chunk starts at a block boundary as in one thread. */
void engine_keep_mask(void *out, int64_t n, uint64_t key, uint32_t dropped, uint32_t one, int bits, int threads) {
    const int64_t chunk = 4 * WIDTH, chunks = (n + chunk - 1) / chunk;
    const uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
#pragma omp parallel num_threads(team_size(threads, chunks, 256))
    {
        int64_t begin, end;
        team_share(chunks, &begin, &end);
        int64_t first = begin * chunk, last = end * chunk < n ? end * chunk : n;
        if (first < last) {
            if (bits == 16)
                keep16((uint16_t *)out + first, last - first, first, k0, k1, dropped, (uint16_t)one);
            else if (bits == 32)
                keep32((uint32_t *)out + first, last - first, first, k0, k1, dropped, one);
            else
                keep_bits((uint8_t *)out + first / 8, last - first, first, k0, k1, dropped);
        }
    }
}

/* count blocks of the stream under (k0, k1) from block first: for known-answer tests. */
void engine_threefry(uint32_t *words, uint64_t first, int64_t count, uint32_t k0, uint32_t k1) {
    for (int64_t done = 0; done < count; done += WIDTH) {
        int64_t chunk = count - done < WIDTH ? count - done : WIDTH;
        threefry_blocks(words + 2 * done, first + (uint64_t)done, (int)chunk, k0, k1);
    }
}
