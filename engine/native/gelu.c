/* GELU on bf16 tensors through tables over the 65536 bf16 values, forward and backward, for
 * engine/native_gelu.py.
 *
 * A bf16 input has only 65536 possible values, so the exact (erf) GELU and its derivative are
 * tabulated once, by ATen itself, when the library loads: the forward is a table lookup (ATen's bf16
 * result, bit for bit), the backward dx = bf16(dy * gelu'(x)) with gelu'(x) ATen's float32
 * derivative, rounded to nearest even as ATen rounds. Elements are split over an OpenMP team (torch's
 * own pool in a torch process: the library links libgomp by the same soname).
 */
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint16_t rounded = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return f != f ? (uint16_t)((u >> 16) | 0x0040u) : rounded; /* NaN stays NaN (quiet) */
}

CLONES
static void forward_range(const uint16_t *x, uint16_t *y, const uint16_t *table, int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i++) y[i] = table[x[i]];
}

CLONES
static void backward_range(const uint16_t *dy, const uint16_t *x, uint16_t *dx, const float *slope, int64_t begin,
                           int64_t end) {
    for (int64_t i = begin; i < end; i++) dx[i] = float_to_bf16(bf16_to_float(dy[i]) * slope[x[i]]);
}

static int team_size(int threads, int64_t n) {
    if ((int64_t)threads * 16384 > n) threads = (int)(n / 16384); /* too little work to pay a thread */
    return threads < 1 ? 1 : threads;
}

void engine_gelu_forward(const uint16_t *x, uint16_t *y, const uint16_t *table, int64_t n, int threads) {
#pragma omp parallel num_threads(team_size(threads, n))
    {
        int team = 1, me = 0;
#ifdef _OPENMP
        team = omp_get_num_threads();
        me = omp_get_thread_num();
#endif
        forward_range(x, y, table, n * me / team, n * (me + 1) / team);
    }
}

void engine_gelu_backward(const uint16_t *dy, const uint16_t *x, uint16_t *dx, const float *slope, int64_t n,
                          int threads) {
#pragma omp parallel num_threads(team_size(threads, n))
    {
        int team = 1, me = 0;
#ifdef _OPENMP
        team = omp_get_num_threads();
        me = omp_get_thread_num();
#endif
        backward_range(dy, x, dx, slope, n * me / team, n * (me + 1) / team);
    }
}
