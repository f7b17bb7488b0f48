/* Softmax over the last dimension of bf16 rows, optionally with dropout applied to its output,
 * forward and backward, for engine/native_softmax.py.
 *
 * The arithmetic is that of the engine's eager bf16 attention (ATen's CPU softmax followed by fast
 * dropout's addcmul), in float32 inside and rounded to bf16 (round to nearest even) on output:
 *   forward:  y = bf16(exp(x - max x) / sum exp(x - max x));  z = bf16(y * scale * keep)
 *   backward: g = bf16(dz * scale * keep);  dx = bf16(y * (g - sum(g * y)))
 * where keep is the 0/1 dropout mask (bf16) and scale = 1 / (1 - p). Without a mask (keep NULL)
 * the forward writes y only and the backward takes g = dz.
 *
 * One pass over each row (its values stay in a float32 scratch row) instead of ATen's separate
 * softmax and dropout passes; exp is a Cephes-style polynomial (within 2 float32 ulps), so a result
 * can differ from ATen's in the last bf16 bit. An AVX-512 path is chosen at load time where the CPU
 * has it; elsewhere the same loops in plain C with expf. Rows are split over an OpenMP team of up
 * to `threads` (the caller passes torch's intra-op thread count; see run()).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "team.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_AVX512_PATH 1
#endif

typedef struct {
    const uint16_t *in;   /* forward: x; backward: dz */
    const uint16_t *y;    /* backward: the forward's y */
    const uint16_t *keep; /* 0/1 mask or NULL */
    uint16_t *out;        /* forward: y; backward: dx */
    uint16_t *out2;       /* forward: z (with keep) */
    float scale;
    int64_t row0, row1, n;
} job_t;

/* ---- plain C ---------------------------------------------------------------------------- */

static void forward_generic(const job_t *job, float *buf) {
    const int64_t n = job->n;
    for (int64_t r = job->row0; r < job->row1; r++) {
        const uint16_t *x = job->in + r * n;
        float m = -INFINITY;
        for (int64_t j = 0; j < n; j++) {
            buf[j] = bf16_to_float(x[j]);
            m = buf[j] > m ? buf[j] : m;
        }
        float sum = 0.0f;
        for (int64_t j = 0; j < n; j++) {
            buf[j] = expf(buf[j] - m);
            sum += buf[j];
        }
        const float inv = 1.0f / sum;
        uint16_t *y = job->out + r * n;
        for (int64_t j = 0; j < n; j++) y[j] = float_to_bf16(buf[j] * inv);
        if (job->keep) {
            const uint16_t *k = job->keep + r * n;
            uint16_t *z = job->out2 + r * n;
            for (int64_t j = 0; j < n; j++)
                z[j] = float_to_bf16(bf16_to_float(y[j]) * job->scale * bf16_to_float(k[j]));
        }
    }
}

static void backward_generic(const job_t *job, float *buf) {
    const int64_t n = job->n;
    for (int64_t r = job->row0; r < job->row1; r++) {
        const uint16_t *dz = job->in + r * n, *y = job->y + r * n;
        const uint16_t *k = job->keep ? job->keep + r * n : NULL;
        float dot = 0.0f;
        for (int64_t j = 0; j < n; j++) {
            float g = bf16_to_float(dz[j]);
            if (k) g = bf16_to_float(float_to_bf16(g * job->scale * bf16_to_float(k[j])));
            buf[j] = g;
            dot += g * bf16_to_float(y[j]);
        }
        uint16_t *dx = job->out + r * n;
        for (int64_t j = 0; j < n; j++) dx[j] = float_to_bf16(bf16_to_float(y[j]) * (buf[j] - dot));
    }
}

/* ---- AVX-512 ---------------------------------------------------------------------------- */

#ifdef HAVE_AVX512_PATH
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

AVX512 static inline __m512 exp512(__m512 x) {
    /* exp(x) = 2^n * exp(r), r = x - n ln 2 in [-ln2/2, ln2/2] (Cephes expf's polynomial); below -104
       the result underflows to 0 in scalef, as expf's does; NaN stays NaN (max returns its second
       operand when either is NaN) */
    x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

static inline __mmask16 lanes(int64_t count) { return count >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << count) - 1); }

/* 16 bf16 values (the first `count`, the rest 0) widened to float32 */
AVX512 static inline __m512 load_bf16(const uint16_t *p, int64_t count) {
    __m256i h = _mm256_maskz_loadu_epi16(lanes(count), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* v rounded to bf16 (nearest even; NaN kept quiet), as float32 bit patterns */
AVX512 static inline __m512 round_bf16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                                    _mm512_or_si512(u, _mm512_set1_epi32(0x00400000)));
    return _mm512_castsi512_ps(_mm512_and_si512(rounded, _mm512_set1_epi32((int)0xFFFF0000u)));
}

/* stores the first `count` of 16 values, which round_bf16 already rounded */
AVX512 static inline void store_bf16(uint16_t *p, __m512 rounded, int64_t count) {
    __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(rounded), 16));
    _mm256_mask_storeu_epi16(p, lanes(count), h);
}

AVX512 static void forward_avx512(const job_t *job, float *buf) {
    const int64_t n = job->n;
    const __m512 scale = _mm512_set1_ps(job->scale);
    for (int64_t r = job->row0; r < job->row1; r++) {
        const uint16_t *x = job->in + r * n;
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < n; j += 16) {
            __mmask16 k = lanes(n - j);
            __m512 v = load_bf16(x + j, n - j);
            _mm512_storeu_ps(buf + j, v);
            vmax = _mm512_mask_max_ps(vmax, k, vmax, v);
        }
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
        __m512 vsum = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) {
            __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(buf + j), m));
            _mm512_storeu_ps(buf + j, e);
            vsum = _mm512_mask_add_ps(vsum, lanes(n - j), vsum, e);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
        uint16_t *y = job->out + r * n;
        const uint16_t *keep = job->keep ? job->keep + r * n : NULL;
        uint16_t *z = job->out2 ? job->out2 + r * n : NULL;
        for (int64_t j = 0; j < n; j += 16) {
            __m512 yb = round_bf16(_mm512_mul_ps(_mm512_loadu_ps(buf + j), inv));
            store_bf16(y + j, yb, n - j);
            if (keep) /* z scales the rounded y, as dropout after the softmax does */
                store_bf16(z + j, round_bf16(_mm512_mul_ps(_mm512_mul_ps(yb, scale), load_bf16(keep + j, n - j))), n - j);
        }
    }
}

AVX512 static void backward_avx512(const job_t *job, float *buf) {
    const int64_t n = job->n;
    const __m512 scale = _mm512_set1_ps(job->scale);
    for (int64_t r = job->row0; r < job->row1; r++) {
        const uint16_t *dz = job->in + r * n, *y = job->y + r * n;
        const uint16_t *keep = job->keep ? job->keep + r * n : NULL;
        __m512 vdot = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) {
            __m512 g = load_bf16(dz + j, n - j);
            if (keep) /* the dropout gradient rounded to bf16, as its own pass would */
                g = round_bf16(_mm512_mul_ps(_mm512_mul_ps(g, scale), load_bf16(keep + j, n - j)));
            _mm512_storeu_ps(buf + j, g);
            vdot = _mm512_fmadd_ps(g, load_bf16(y + j, n - j), vdot); /* zero beyond n: y's tail is 0 */
        }
        const __m512 dot = _mm512_set1_ps(_mm512_reduce_add_ps(vdot));
        uint16_t *dx = job->out + r * n;
        for (int64_t j = 0; j < n; j += 16) {
            __m512 v = _mm512_mul_ps(load_bf16(y + j, n - j), _mm512_sub_ps(_mm512_loadu_ps(buf + j), dot));
            store_bf16(dx + j, round_bf16(v), n - j);
        }
    }
}
#endif

/* ---- dispatch and threads ------------------------------------------------------------------ */

typedef void (*kernel_t)(const job_t *, float *);

static int use_avx512(void) {
#ifdef HAVE_AVX512_PATH
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
    }
    return cached;
#else
    return 0;
#endif
}

/* Returns 0, or -1 when memory for a scratch row could not be had. Rows are split over an OpenMP
   team (team.h): torch's warm intra-op pool rather than threads started per call. */
static int run(job_t job, int backward, int threads, int force_generic) {
    kernel_t kernel = backward ? backward_generic : forward_generic;
#ifdef HAVE_AVX512_PATH
    if (!force_generic && use_avx512()) kernel = backward ? backward_avx512 : forward_avx512;
#endif
    const int64_t rows = job.row1 - job.row0;
    int failed = 0;
#pragma omp parallel num_threads(team_size(threads, rows, 64)) reduction(| : failed)
    {
        int64_t begin, end;
        team_share(rows, &begin, &end);
        job_t mine = job;
        mine.row0 = job.row0 + begin;
        mine.row1 = job.row0 + end;
        float *buf = (float *)malloc(((size_t)job.n + 16) * sizeof(float));
        if (buf) {
            kernel(&mine, buf);
            free(buf);
        } else {
            failed = 1;
        }
    }
    return failed ? -1 : 0;
}

int engine_softmax_forward(const uint16_t *x, uint16_t *y, const uint16_t *keep, uint16_t *z, float scale,
                           int64_t rows, int64_t n, int threads, int force_generic) {
    job_t job = {x, NULL, keep, y, z, scale, 0, rows, n};
    return run(job, 0, threads, force_generic);
}

int engine_softmax_backward(const uint16_t *dz, const uint16_t *y, const uint16_t *keep, uint16_t *dx, float scale,
                            int64_t rows, int64_t n, int threads, int force_generic) {
    job_t job = {dz, y, keep, dx, NULL, scale, 0, rows, n};
    return run(job, 1, threads, force_generic);
}

/* 1 when the AVX-512 path is in use on this CPU */
int engine_softmax_avx512(void) { return use_avx512(); }
