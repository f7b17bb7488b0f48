/* AdamW over the rows of an embedding matrix (float32), for engine/native_adamw.py.
 *
 * Most rows of a word embedding never see a gradient in a fine-tuning run (MRPC touches a minority of
 * BERT's 30522 word pieces). While a row has had no non-zero gradient its two moments are exactly
 * zero, and so AdamW's update of it is exactly the weight decay alone: the moments stay 0 and the
 * Adam term is 0 / (0 + eps) = 0. `active` marks the rows whose moments may be non-zero; for the
 * others the kernel reads the gradient row and, while it is all zero, only multiplies the weights by
 * the decay (skipping the moments, 16 of the 28 bytes a parameter that a full step moves). A row
 * whose gradient is non-zero becomes active and, from then on, takes the full step. Where the caller
 * lists the rows the step's gradient wrote (the sparse embedding gradient's buffer knows them), the
 * other rows' gradients are not even read.
 *
 * The full step is the arithmetic of ATen's fused CPU AdamW (adamw_math.h; the scaled gradient is
 * stored back, as ATen does), tested bit for bit against torch.optim.AdamW(fused=True). Rows are
 * split over an OpenMP team (torch's own pool in a torch process: same libgomp soname).
 */
#include <math.h>
#include <stdint.h>

#include "adamw_math.h"
#include "clones.h"
#include "team.h"

typedef struct {
    float *param, *grad, *exp_avg, *exp_avg_sq;
    uint8_t *active;
    int64_t rows, cols;
    adamw_scalars s;
    int rows_known; /* the caller listed every row whose gradient may be non-zero (marked active first) */
} step_args;

CLONES
static int all_zero(const float *restrict g, int64_t n) {
    int nonzero = 0;
    for (int64_t j = 0; j < n; j++) nonzero |= g[j] != 0.0f;
    return !nonzero;
}

CLONES
static void decay_row(float *restrict p, int64_t n, float decay) {
    for (int64_t j = 0; j < n; j++) p[j] = p[j] * decay;
}

#define GRAD_AT(j) g[j]
#define STORE_SCALED(j, value) g[j] = (value)

CLONES
static void full_row(const step_args *a, float *restrict p, float *restrict g, float *restrict m, float *restrict v) {
    const int64_t n = a->cols;
    ADAMW_STEP(a->s, GRAD_AT, STORE_SCALED);
}

static void rows_range(const step_args *a, int64_t begin, int64_t end) {
    const int64_t n = a->cols;
    for (int64_t r = begin; r < end; r++) {
        float *p = a->param + r * n, *g = a->grad + r * n;
        if (!a->active[r]) {
            /* moments 0 and gradient 0: the weight decay is the whole update */
            if (a->rows_known || all_zero(g, n)) {
                if (a->s.decay_on) decay_row(p, n, a->s.decay);
                continue;
            }
            a->active[r] = 1;
        }
        full_row(a, p, g, a->exp_avg + r * n, a->exp_avg_sq + r * n);
    }
}

/* One AdamW step of a rows x cols float32 matrix; the scalars as ATen's fused kernel derives them
 * (in double) from lr, betas, eps, weight decay and the step count. grad_scale <= 0: none. `listed`
 * (listed_count >= 0): every row whose gradient may be non-zero, so no other row's gradient is
 * read; listed_count < 0: unknown, each inactive row's gradient is read. Returns the number of
 * active rows after the step, or -1 (nothing stepped) where a listed row is outside the matrix. */
int64_t engine_adamw_rows(float *param, float *grad, float *exp_avg, float *exp_avg_sq, uint8_t *active,
                          const int64_t *listed, int64_t listed_count, int64_t rows, int64_t cols, double lr,
                          double beta1, double beta2, double eps, double weight_decay, double bias_correction1,
                          double bias_correction2_sqrt, double grad_scale, int threads) {
    /* A listed row marked active whose gradient is zero still steps as decay alone: its moments are 0. */
    for (int64_t i = 0; i < listed_count; i++) {
        if (listed[i] < 0 || listed[i] >= rows) return -1;
        active[listed[i]] = 1;
    }
    step_args a = {param,      grad, exp_avg, exp_avg_sq, active, rows, cols,
                   adamw_scalars_of(lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2_sqrt,
                                    grad_scale),
                   listed_count >= 0};
#pragma omp parallel num_threads(team_size(threads, rows, 1))
    {
        int64_t begin, end;
        team_share(rows, &begin, &end);
        rows_range(&a, begin, end);
    }
    int64_t count = 0;
    for (int64_t r = 0; r < rows; r++) count += active[r];
    return count;
}
