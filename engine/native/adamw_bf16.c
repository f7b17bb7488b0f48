/* AdamW of float32 master weights whose bf16 copies the forward uses, for engine/bf16_weights.py.
 *
 * Under bf16 autocast every linear casts its float32 weight to bf16 in each forward, and the bf16
 * gradient autograd computes is cast back to float32 before it is accumulated. Here the forward
 * uses bf16 weights directly (no cast) and their gradients stay bf16; this step reads them, steps
 * the float32 masters and their moments with ATen's fused CPU AdamW arithmetic (adamw_math.h) and
 * writes each new master rounded to bf16 (to nearest even, as torch's cast rounds) into the weight
 * the next forward uses. A bf16 gradient widened to float32 is exactly what autocast's cast back
 * gives, so masters, moments and bf16 weights equal those of autocast's float32 weights under
 * torch.optim.AdamW(fused=True) bit for bit (tested).
 *
 * One call steps a list of tensors: their elements are split over an OpenMP team (torch's own pool
 * in a torch process: same libgomp soname) in contiguous shares of the whole list.
 */
#include <math.h>
#include <stdint.h>

#include "adamw_math.h"
#include "bf16.h"
#include "clones.h"
#include "team.h"

/* The elements of a list of `count` tensors of sizes[i] elements, as one index space. */
static int64_t list_total(int64_t count, const int64_t *sizes) {
    int64_t total = 0;
    for (int64_t i = 0; i < count; i++) total += sizes[i];
    return total;
}

/* For each tensor i that the list's range [begin, end) overlaps: BODY with its local [lo, hi). */
#define FOR_EACH_SLICE(count, sizes, begin, end, BODY)                                        \
    do {                                                                                     \
        int64_t first = 0; /* the list's index of tensor i's first element */                \
        for (int64_t i = 0; i < (count) && first < (end); first += (sizes)[i], i++) {        \
            const int64_t lo = (begin) > first ? (begin) - first : 0;                        \
            const int64_t hi = (end) < first + (sizes)[i] ? (end) - first : (sizes)[i];      \
            if (lo < hi) BODY;                                                               \
        }                                                                                    \
    } while (0)

#define GRAD_AT(j) g[j]
#define NOTHING(j, value)
#define BLOCK 2048 /* elements a pass: the block's float32 gradients and new weights stay in L1 */

/* Three simple loops over each block, each vectorised (gcc does not vectorise one loop that both
 * widens the bf16 gradient and rounds the new weight with the step between). */
CLONES
static void step_slice(const adamw_scalars *s_in, int64_t size, float *restrict p_all, uint16_t *restrict w16,
                       const uint16_t *restrict g16, float *restrict m_all, float *restrict v_all) {
    const adamw_scalars s = *s_in;
    float g[BLOCK];
    for (int64_t start = 0; start < size; start += BLOCK) {
        const int64_t n = size - start < BLOCK ? size - start : BLOCK;
        float *restrict p = p_all + start, *restrict m = m_all + start, *restrict v = v_all + start;
        for (int64_t j = 0; j < n; j++) g[j] = bf16_to_float(g16[start + j]);
        ADAMW_STEP(s, GRAD_AT, NOTHING);
        for (int64_t j = 0; j < n; j++) w16[start + j] = float_to_bf16(p[j]);
    }
}

/* One AdamW step of `count` tensors of sizes[i] elements: float32 masters params[i], their bf16
 * weights weights[i] (written), bf16 gradients grads[i] (read only) and float32 moments; the scalars
 * as ATen's fused kernel derives them (in double) from lr, betas, eps, weight decay and the step
 * count. grad_scale <= 0: none. */
void engine_adamw_bf16(int64_t count, float *const *params, uint16_t *const *weights, const uint16_t *const *grads,
                       float *const *exp_avgs, float *const *exp_avg_sqs, const int64_t *sizes, double lr,
                       double beta1, double beta2, double eps, double weight_decay, double bias_correction1,
                       double bias_correction2_sqrt, double grad_scale, int threads) {
    const adamw_scalars s = adamw_scalars_of(lr, beta1, beta2, eps, weight_decay, bias_correction1,
                                             bias_correction2_sqrt, grad_scale);
    const int64_t total = list_total(count, sizes);
#pragma omp parallel num_threads(team_size(threads, total, 16384))
    {
        int64_t begin, end;
        team_share(total, &begin, &end);
        FOR_EACH_SLICE(count, sizes, begin, end,
                       step_slice(&s, hi - lo, params[i] + lo, weights[i] + lo, grads[i] + lo, exp_avgs[i] + lo,
                                  exp_avg_sqs[i] + lo));
    }
}

#define LANES 16

/* The sum of squares of one thread's share: 16 float lanes a block (vectorised), added in double. */
CLONES
static double sum_squares(const uint16_t *restrict g, int64_t size) {
    double total = 0.0;
    for (int64_t start = 0; start < size; start += BLOCK) {
        const int64_t n = size - start < BLOCK ? size - start : BLOCK;
        float lane[LANES] = {0};
        int64_t j = 0;
        for (; j + LANES <= n; j += LANES)
            for (int k = 0; k < LANES; k++) {
                const float x = bf16_to_float(g[start + j + k]);
                lane[k] += x * x;
            }
        for (; j < n; j++) {
            const float x = bf16_to_float(g[start + j]);
            lane[0] += x * x;
        }
        for (int k = 0; k < LANES; k++) total += lane[k];
    }
    return total;
}

/* The 2-norm of `count` bf16 gradients together (NaN or inf where one holds either); the same figure
 * for the same inputs and thread count (each thread's partial sum added in thread order). */
double engine_bf16_norm(int64_t count, const uint16_t *const *grads, const int64_t *sizes, int threads) {
    enum { MAX_TEAM = 256 };
    double partial[MAX_TEAM] = {0};
    const int64_t total = list_total(count, sizes);
    int team = team_size(threads, total, 16384);
    if (team > MAX_TEAM) team = MAX_TEAM;
#pragma omp parallel num_threads(team)
    {
        int64_t begin, end;
        team_share(total, &begin, &end);
        double sum = 0.0;
        FOR_EACH_SLICE(count, sizes, begin, end, sum += sum_squares(grads[i] + lo, hi - lo));
#ifdef _OPENMP
        partial[omp_get_thread_num()] = sum;
#else
        partial[0] = sum;
#endif
    }
    double sum = 0.0;
    for (int t = 0; t < team; t++) sum += partial[t];
    return sqrt(sum);
}

