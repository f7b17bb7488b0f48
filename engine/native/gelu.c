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

#include "bf16.h"
#include "clones.h"
#include "team.h"

CLONES
static void forward_range(const uint16_t *x, uint16_t *y, const uint16_t *table, int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i++) y[i] = table[x[i]];
}

CLONES
static void backward_range(const uint16_t *dy, const uint16_t *x, uint16_t *dx, const float *slope, int64_t begin,
                           int64_t end) {
    for (int64_t i = begin; i < end; i++) dx[i] = float_to_bf16(bf16_to_float(dy[i]) * slope[x[i]]);
}

typedef struct {
    const uint16_t *a, *b; /* forward: x; backward: dy, x */
    uint16_t *out;
    const void *table; /* forward: the bf16 GELU table; backward: the float32 slope table */
} gelu_args;

static void forward_body(const gelu_args *g, int64_t begin, int64_t end) {
    forward_range(g->a, g->out, (const uint16_t *)g->table, begin, end);
}

static void backward_body(const gelu_args *g, int64_t begin, int64_t end) {
    backward_range(g->a, g->b, g->out, (const float *)g->table, begin, end);
}

/* body over [0, n) cut into one contiguous range per thread of the team */
static void in_parallel(void (*body)(const gelu_args *, int64_t, int64_t), const gelu_args *g, int64_t n,
                        int threads) {
#pragma omp parallel num_threads(team_size(threads, n, 16384))
    {
        int64_t begin, end;
        team_share(n, &begin, &end);
        body(g, begin, end);
    }
}

void engine_gelu_forward(const uint16_t *x, uint16_t *y, const uint16_t *table, int64_t n, int threads) {
    gelu_args g = {x, NULL, y, table};
    in_parallel(forward_body, &g, n, threads);
}

void engine_gelu_backward(const uint16_t *dy, const uint16_t *x, uint16_t *dx, const float *slope, int64_t n,
                          int threads) {
    gelu_args g = {dy, x, dx, slope};
    in_parallel(backward_body, &g, n, threads);
}
