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
 * The full step is the arithmetic of ATen's fused CPU AdamW (adam_math, ADAMW mode, no amsgrad, no
 * maximize), in float32 with the scalars rounded to float32 as it rounds them:
 *   g = g / grad_scale (when given; stored back, as ATen does)
 *   p = p * (1 - lr * wd)                                      (when wd != 0)
 *   m = fma(w, g - m, m), w = 1 - beta1                          (torch.lerp; w < 0.5,
 *       else fma(w - 1, g - m, g))
 *   v = fma((1 - beta2) * g, g, v * beta2)                    (ATen's build contracts it so)
 *   p = p + (-lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
 * Built with -ffp-contract=off, so no other product is fused into an addition; tested bit for bit
 * against torch.optim.AdamW(fused=True). Rows are split over an OpenMP team (torch's own pool in a
 * torch process: same libgomp soname).
 */
#include <math.h>
#include <stdint.h>

#include "clones.h"
#include "team.h"

typedef struct {
    float *param, *grad, *exp_avg, *exp_avg_sq;
    uint8_t *active;
    int64_t rows, cols;
    int decay_on;
    float decay, lerp_weight, beta2, sq_weight, bias_correction2_sqrt, eps, neg_step_size, grad_scale;
    int scaled, small_weight;
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

/* The scalars are locals (not loads through `a`, which the stores could alias) and the branches
 * are outside the loop, so each variant vectorises. */
#define FULL_ROW_LOOP(SCALED, DECAY, SMALL)                                                             \
    for (int64_t j = 0; j < n; j++) {                                                                  \
        float grad = g[j];                                                                             \
        if (SCALED) {                                                                                  \
            grad = grad / scale;                                                                       \
            g[j] = grad;                                                                               \
        }                                                                                              \
        const float param = (DECAY) ? p[j] * decay : p[j];                                             \
        const float avg = (SMALL) ? fmaf(w, grad - m[j], m[j]) : fmaf(w - 1.0f, grad - m[j], grad);    \
        const float sq = fmaf(sq_weight * grad, grad, v[j] * beta2); /* as ATen's build contracts it */ \
        m[j] = avg;                                                                                    \
        v[j] = sq;                                                                                     \
        p[j] = param + neg_step_size * avg / (sqrtf(sq) / bc2_sqrt + eps);                             \
    }

CLONES
static void full_row(const step_args *a, float *restrict p, float *restrict g, float *restrict m, float *restrict v) {
    const int64_t n = a->cols;
    const float scale = a->grad_scale, decay = a->decay, w = a->lerp_weight, beta2 = a->beta2;
    const float sq_weight = a->sq_weight, bc2_sqrt = a->bias_correction2_sqrt, eps = a->eps;
    const float neg_step_size = a->neg_step_size;
    if (a->small_weight) {
        if (a->scaled && a->decay_on) FULL_ROW_LOOP(1, 1, 1)
        else if (a->scaled) FULL_ROW_LOOP(1, 0, 1)
        else if (a->decay_on) FULL_ROW_LOOP(0, 1, 1)
        else FULL_ROW_LOOP(0, 0, 1)
    } else {
        if (a->scaled && a->decay_on) FULL_ROW_LOOP(1, 1, 0)
        else if (a->scaled) FULL_ROW_LOOP(1, 0, 0)
        else if (a->decay_on) FULL_ROW_LOOP(0, 1, 0)
        else FULL_ROW_LOOP(0, 0, 0)
    }
}

static void rows_range(const step_args *a, int64_t begin, int64_t end) {
    const int64_t n = a->cols;
    for (int64_t r = begin; r < end; r++) {
        float *p = a->param + r * n, *g = a->grad + r * n;
        if (!a->active[r]) {
            /* moments 0 and gradient 0: the weight decay is the whole update */
            if (a->rows_known || all_zero(g, n)) {
                if (a->decay_on) decay_row(p, n, a->decay);
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
    step_args a = {param,
                   grad,
                   exp_avg,
                   exp_avg_sq,
                   active,
                   rows,
                   cols,
                   weight_decay != 0.0,
                   (float)(1.0 - lr * weight_decay),
                   (float)(1.0 - beta1),
                   (float)beta2,
                   (float)(1.0 - beta2),
                   (float)bias_correction2_sqrt,
                   (float)eps,
                   (float)(-(lr / bias_correction1)),
                   (float)grad_scale,
                   grad_scale > 0.0,
                   fabsf((float)(1.0 - beta1)) < 0.5f,
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
