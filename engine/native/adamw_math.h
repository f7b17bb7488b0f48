/* ATen's fused CPU AdamW arithmetic (adam_math, ADAMW mode, no amsgrad, no maximize), shared by
 * adamw_rows.c (the word embedding by rows) and adamw_bf16.c (float32 masters of bf16 weights).
 * In float32, with the scalars rounded to float32 as ATen rounds them:
 *   g = g / grad_scale                                          (when given)
 *   p = p * (1 - lr * wd)                                       (when wd != 0)
 *   m = fma(w, g - m, m), w = 1 - beta1                         (torch.lerp: w < 0.5,
 *       else fma(w - 1, g - m, g))
 *   v = fma((1 - beta2) * g, g, v * beta2)                      (ATen's build contracts it so)
 *   p = p + (-lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
 * Sources including it are built with -ffp-contract=off (no other product is fused into an
 * addition) and -fno-math-errno (sqrtf vectorises); both kernels are tested bit for bit against
 * torch.optim.AdamW(fused=True). engine/native_masks.py hashes this header with each source. */
#ifndef ENGINE_ADAMW_MATH_H
#define ENGINE_ADAMW_MATH_H

#include <math.h>
#include <stdint.h>

typedef struct {
    float decay, lerp_weight, beta2, sq_weight, bias_correction2_sqrt, eps, neg_step_size, grad_scale;
    int decay_on, scaled, small_weight;
} adamw_scalars;

/* The float32 scalars from lr, betas, eps, weight decay, the bias corrections and grad_scale (<= 0:
 * none), derived in double as ATen's fused kernel derives them. */
static inline adamw_scalars adamw_scalars_of(double lr, double beta1, double beta2, double eps, double weight_decay,
                                             double bias_correction1, double bias_correction2_sqrt,
                                             double grad_scale) {
    adamw_scalars s = {(float)(1.0 - lr * weight_decay),
                       (float)(1.0 - beta1),
                       (float)beta2,
                       (float)(1.0 - beta2),
                       (float)bias_correction2_sqrt,
                       (float)eps,
                       (float)(-(lr / bias_correction1)),
                       (float)grad_scale,
                       weight_decay != 0.0,
                       grad_scale > 0.0,
                       fabsf((float)(1.0 - beta1)) < 0.5f};
    return s;
}

/* One loop over n elements of p, m, v. GRAD_AT(j): the gradient as float; SCALED_AT(j, value): where
 * the scaled gradient is stored back (or nothing). The scalars are locals (not loads through a pointer the stores could
 * alias) and the branches are outside the loop, so each variant vectorises. */
#define ADAMW_LOOP(SCALED, DECAY, SMALL, GRAD_AT, SCALED_AT)                                 \
    for (int64_t j = 0; j < n; j++) {                                                                  \
        float grad = GRAD_AT(j);                                                                       \
        if (SCALED) {                                                                                  \
            grad = grad / scale;                                                                       \
            SCALED_AT(j, grad);                                                                        \
        }                                                                                              \
        const float param = (DECAY) ? p[j] * decay : p[j];                                             \
        const float avg = (SMALL) ? fmaf(w, grad - m[j], m[j]) : fmaf(w - 1.0f, grad - m[j], grad);    \
        const float sq = fmaf(sq_weight * grad, grad, v[j] * beta2); /* as ATen's build contracts it */ \
        m[j] = avg;                                                                                    \
        v[j] = sq;                                                                                     \
        p[j] = param + neg_step_size * avg / (sqrtf(sq) / bc2_sqrt + eps);                             \
    }

/* The step of n elements of p, m, v under the scalars `s`, one loop variant per branch. */
#define ADAMW_STEP(s, GRAD_AT, SCALED_AT)                                                     \
    do {                                                                                               \
        const float scale = (s).grad_scale, decay = (s).decay, w = (s).lerp_weight, beta2 = (s).beta2; \
        const float sq_weight = (s).sq_weight, bc2_sqrt = (s).bias_correction2_sqrt, eps = (s).eps;    \
        const float neg_step_size = (s).neg_step_size;                                                 \
        if ((s).small_weight) {                                                                        \
            if ((s).scaled && (s).decay_on) ADAMW_LOOP(1, 1, 1, GRAD_AT, SCALED_AT)        \
            else if ((s).scaled) ADAMW_LOOP(1, 0, 1, GRAD_AT, SCALED_AT)                   \
            else if ((s).decay_on) ADAMW_LOOP(0, 1, 1, GRAD_AT, SCALED_AT)                 \
            else ADAMW_LOOP(0, 0, 1, GRAD_AT, SCALED_AT)                                   \
        } else {                                                                                       \
            if ((s).scaled && (s).decay_on) ADAMW_LOOP(1, 1, 0, GRAD_AT, SCALED_AT)        \
            else if ((s).scaled) ADAMW_LOOP(1, 0, 0, GRAD_AT, SCALED_AT)                   \
            else if ((s).decay_on) ADAMW_LOOP(0, 1, 0, GRAD_AT, SCALED_AT)                 \
            else ADAMW_LOOP(0, 0, 0, GRAD_AT, SCALED_AT)                                   \
        }                                                                                              \
    } while (0)

#endif
