/* bf16 <-> float32 for the engine's C kernels (included by softmax.c and gelu.c; engine/native_masks.py
 * hashes this header with each source, so a change here rebuilds them). */
#ifndef ENGINE_BF16_H
#define ENGINE_BF16_H

#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* round to nearest even, as torch rounds float32 to bf16; NaN stays NaN (quiet) */
static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint16_t rounded = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return f != f ? (uint16_t)((u >> 16) | 0x0040u) : rounded;
}

#endif
