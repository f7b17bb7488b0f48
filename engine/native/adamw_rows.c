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
 * Lazy decay. Where the caller lists the rows, the decay of the other inactive rows can wait: the
 * step appends its decay factor to `factors` instead of multiplying those rows (8 bytes a parameter
 * of memory traffic each step), and a row takes the factors it has not had yet (`applied[r]` of
 * them so far), one multiply each in order, exactly as the steps would have, when it is next read:
 * before a forward looks it up (engine_catch_up_rows, from the embedding's forward pre-hook), when
 * the step lists it (here), and before the weights are saved (all rows).
 *
 * The full step is the arithmetic of ATen's fused CPU AdamW (adamw_math.h; the scaled gradient is
 * stored back, as ATen does), tested bit for bit against torch.optim.AdamW(fused=True). Rows are
 * split over an OpenMP team (torch's own pool in a torch process: same libgomp soname).
 */
#include <math.h>
#include <stddef.h>
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
    int lazy;       /* rows_known and the inactive rows' decay appended to the factors, not applied */
} step_args;

#define HELD 128 /* floats of a row kept in registers while the factors are multiplied in */

/* Row p (n floats) multiplied by factors[from .. to - 1] in order: the decay-only steps it missed.
   HELD floats at a time stay in registers across the factors (independent products each factor). */
CLONES
static void catch_up(float *restrict p, int64_t n, const float *restrict factors, int32_t from, int32_t to) {
    int64_t j = 0;
    for (; j + HELD <= n; j += HELD) {
        float held[HELD];
        for (int i = 0; i < HELD; i++) held[i] = p[j + i];
        for (int32_t k = from; k < to; k++) {
            const float decay = factors[k];
            for (int i = 0; i < HELD; i++) held[i] = held[i] * decay;
        }
        for (int i = 0; i < HELD; i++) p[j + i] = held[i];
    }
    for (int32_t k = from; k < to; k++) {
        const float decay = factors[k];
        for (int64_t i = j; i < n; i++) p[i] = p[i] * decay;
    }
}

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
            /* moments 0 and gradient 0: the weight decay is the whole update (or waits: lazy) */
            if (a->rows_known || all_zero(g, n)) {
                if (a->s.decay_on && !a->lazy) decay_row(p, n, a->s.decay);
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
 * read; listed_count < 0: unknown, each inactive row's gradient is read. `factors` (non-NULL, only
 * with listed rows): lazy decay, with `*factor_count` factors so far, `applied` per row, room for one
 * more factor: the listed rows catch up first, and a decaying step appends its factor. Returns the
 * number of active rows after the step, or -1 (nothing stepped) where a listed row is outside the
 * matrix. */
int64_t engine_adamw_rows(float *param, float *grad, float *exp_avg, float *exp_avg_sq, uint8_t *active,
                          const int64_t *listed, int64_t listed_count, int64_t rows, int64_t cols, float *factors,
                          int32_t *factor_count, int32_t *applied, double lr, double beta1, double beta2, double eps,
                          double weight_decay, double bias_correction1, double bias_correction2_sqrt,
                          double grad_scale, int threads) {
    const int lazy = factors != NULL && listed_count >= 0;
    for (int64_t i = 0; i < listed_count; i++)
        if (listed[i] < 0 || listed[i] >= rows) return -1;
    /* A listed row marked active whose gradient is zero still steps as decay alone: its moments are 0. */
    for (int64_t i = 0; i < listed_count; i++) {
        const int64_t r = listed[i];
        if (lazy && !active[r] && applied[r] < *factor_count) {
            catch_up(param + r * cols, cols, factors, applied[r], *factor_count);
            applied[r] = *factor_count;
        }
        active[r] = 1;
    }
    step_args a = {param,      grad, exp_avg, exp_avg_sq, active, rows, cols,
                   adamw_scalars_of(lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2_sqrt,
                                    grad_scale),
                   listed_count >= 0, lazy};
#pragma omp parallel num_threads(team_size(threads, rows, 1))
    {
        int64_t begin, end;
        team_share(rows, &begin, &end);
        rows_range(&a, begin, end);
    }
    if (lazy && a.s.decay_on) factors[(*factor_count)++] = a.s.decay;
    int64_t count = 0;
    for (int64_t r = 0; r < rows; r++) count += active[r];
    return count;
}

/* The lazily decayed rows (inactive) among ids[0 .. count - 1] (repeats allowed; NULL ids: every
 * row) take the factors they have not had; an active row took each step's decay in its full step.
 * Returns -1 where an id is outside the matrix (nothing done), else 0. */
int64_t engine_catch_up_rows(float *param, const uint8_t *active, const int64_t *ids, int64_t count, int64_t rows,
                             int64_t cols, const float *factors, int32_t factor_count, int32_t *applied, int threads) {
    if (ids == NULL) {
#pragma omp parallel for num_threads(team_size(threads, rows, 256)) schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            if (!active[r] && applied[r] < factor_count)
                catch_up(param + r * cols, cols, factors, applied[r], factor_count);
            applied[r] = factor_count;
        }
        return 0;
    }
    for (int64_t i = 0; i < count; i++)
        if (ids[i] < 0 || ids[i] >= rows) return -1;
    /* An id may repeat: each thread takes the rows r with r % team == its number, so a row is one
       thread's. */
#pragma omp parallel num_threads(team_size(threads, count, 256))
    {
        int64_t team = 1, me = 0;
#ifdef _OPENMP
        team = omp_get_num_threads();
        me = omp_get_thread_num();
#endif
        for (int64_t i = 0; i < count; i++) {
            const int64_t r = ids[i];
            if (r % team == me && !active[r] && applied[r] < factor_count) {
                catch_up(param + r * cols, cols, factors, applied[r], factor_count);
                applied[r] = factor_count;
            }
        }
    }
    return 0;
}
