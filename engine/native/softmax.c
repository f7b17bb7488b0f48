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

#define GROUP 4 /* rows the AVX-512 softmax takes side by side */

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

/* A dropout mask given as bf16 0/1 rows (keep) or as packed bits (bits: bit e % 8 of byte e / 8 for
   element e, rows starting at bit first + r * row); NULL for both: no dropout. */
typedef struct {
    const uint16_t *keep;
    const uint8_t *bits;
    int64_t first, row;
} mask_t;

/* lanes j .. j + 15 of row r of the mask as 0.0 / 1.0 (0 past the row's n) */
AVX512 static inline __m512 mask_lanes(const mask_t *mask, int64_t r, int64_t j, int64_t n) {
    if (!mask->bits) return load_bf16(mask->keep + r * mask->row + j, n - j);
    const int64_t e = mask->first + r * mask->row + j;
    uint32_t word;
    memcpy(&word, mask->bits + (e >> 3), sizeof word);
    return _mm512_maskz_mov_ps((__mmask16)(word >> (e & 7)) & lanes(n - j), _mm512_set1_ps(1.0f));
}

/* The softmax of `rows` rows (a constant 1 or GROUP where inlined) whose float32 values are in buf
   (rows ldb apart) and whose running maxima are vmax[r]: y = bf16(softmax), z = bf16(y * scale *
   keep) where keep is given. Each row's arithmetic is the same whatever `rows` is; rows side by side
   only overlap their dependency chains (a row's reductions, exp and division wait on each other). */
AVX512 static inline __attribute__((always_inline)) void softmax_rows(float *buf, int64_t ldb, const __m512 *vmax,
                                                                      const int rows, int64_t n, uint16_t *y,
                                                                      int64_t y_row, const mask_t *mask, uint16_t *z,
                                                                      int64_t z_row, __m512 scale) {
    const int keep = mask->keep || mask->bits;
    __m512 m[GROUP], vsum[GROUP], inv[GROUP];
    for (int r = 0; r < rows; r++) {
        m[r] = _mm512_set1_ps(_mm512_reduce_max_ps(vmax[r]));
        vsum[r] = _mm512_setzero_ps();
    }
    for (int64_t j = 0; j < n; j += 16)
        for (int r = 0; r < rows; r++) {
            __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(buf + r * ldb + j), m[r]));
            _mm512_storeu_ps(buf + r * ldb + j, e);
            vsum[r] = _mm512_mask_add_ps(vsum[r], lanes(n - j), vsum[r], e);
        }
    for (int r = 0; r < rows; r++) inv[r] = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum[r]));
    for (int64_t j = 0; j < n; j += 16)
        for (int r = 0; r < rows; r++) {
            __m512 yb = round_bf16(_mm512_mul_ps(_mm512_loadu_ps(buf + r * ldb + j), inv[r]));
            store_bf16(y + r * y_row + j, yb, n - j);
            if (keep) /* z scales the rounded y, as dropout after the softmax does */
                store_bf16(z + r * z_row + j,
                           round_bf16(_mm512_mul_ps(_mm512_mul_ps(yb, scale), mask_lanes(mask, r, j, n))), n - j);
        }
}

/* rows of bf16 x (`rows` a constant 1 or GROUP) widened into buf with their running maxima, then
   softmax_rows */
AVX512 static inline __attribute__((always_inline)) void forward_group(const job_t *job, int64_t r0, const int rows,
                                                                       float *buf, int64_t ldb, __m512 scale) {
    const int64_t n = job->n;
    __m512 vmax[GROUP];
    for (int r = 0; r < rows; r++) vmax[r] = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < n; j += 16)
        for (int r = 0; r < rows; r++) {
            __m512 v = load_bf16(job->in + (r0 + r) * n + j, n - j);
            _mm512_storeu_ps(buf + r * ldb + j, v);
            vmax[r] = _mm512_mask_max_ps(vmax[r], lanes(n - j), vmax[r], v);
        }
    const mask_t mask = {job->keep ? job->keep + r0 * n : NULL, NULL, 0, n};
    softmax_rows(buf, ldb, vmax, rows, n, job->out + r0 * n, n, &mask, job->out2 ? job->out2 + r0 * n : NULL, n, scale);
}

/* buf: GROUP rows of up16(n) floats */
AVX512 static void forward_avx512(const job_t *job, float *buf) {
    const __m512 scale = _mm512_set1_ps(job->scale);
    const int64_t ldb = (job->n + 15) & ~(int64_t)15;
    int64_t r = job->row0;
    for (; r + GROUP <= job->row1; r += GROUP) forward_group(job, r, GROUP, buf, ldb, scale);
    for (; r < job->row1; r++) forward_group(job, r, 1, buf, ldb, scale);
}

/* The softmax and dropout backward of `rows` rows (a constant 1 or GROUP), the gradient g of z
   already in buf as float32 (rows ldb apart; bf16 values) with keep not yet applied:
   dx = bf16(y * (g' - sum(g' * y))), g' = bf16(g * scale * keep) with keep, g without */
AVX512 static inline __attribute__((always_inline)) void softmax_grad_rows(float *buf, int64_t ldb, const int rows,
                                                                           int64_t n, const uint16_t *y, int64_t y_row,
                                                                           const mask_t *mask, uint16_t *dx,
                                                                           int64_t dx_row, __m512 scale) {
    const int keep = mask->keep || mask->bits;
    __m512 vdot[GROUP], dot[GROUP];
    for (int r = 0; r < rows; r++) vdot[r] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16)
        for (int r = 0; r < rows; r++) {
            __m512 g = _mm512_loadu_ps(buf + r * ldb + j);
            if (keep) { /* the dropout gradient rounded to bf16, as its own pass would */
                g = round_bf16(_mm512_mul_ps(_mm512_mul_ps(g, scale), mask_lanes(mask, r, j, n)));
                _mm512_storeu_ps(buf + r * ldb + j, g);
            }
            /* zero beyond n: y's tail is 0 */
            vdot[r] = _mm512_fmadd_ps(g, load_bf16(y + r * y_row + j, n - j), vdot[r]);
        }
    for (int r = 0; r < rows; r++) dot[r] = _mm512_set1_ps(_mm512_reduce_add_ps(vdot[r]));
    for (int64_t j = 0; j < n; j += 16)
        for (int r = 0; r < rows; r++) {
            __m512 v = _mm512_mul_ps(load_bf16(y + r * y_row + j, n - j),
                                     _mm512_sub_ps(_mm512_loadu_ps(buf + r * ldb + j), dot[r]));
            store_bf16(dx + r * dx_row + j, round_bf16(v), n - j);
        }
}

AVX512 static inline __attribute__((always_inline)) void backward_group(const job_t *job, int64_t r0, const int rows,
                                                                        float *buf, int64_t ldb, __m512 scale) {
    const int64_t n = job->n;
    for (int r = 0; r < rows; r++)
        for (int64_t j = 0; j < n; j += 16) /* bf16 beyond n is read as 0 */
            _mm512_storeu_ps(buf + r * ldb + j, load_bf16(job->in + (r0 + r) * n + j, n - j));
    const mask_t mask = {job->keep ? job->keep + r0 * n : NULL, NULL, 0, n};
    softmax_grad_rows(buf, ldb, rows, n, job->y + r0 * n, n, &mask, job->out + r0 * n, n, scale);
}

AVX512 static void backward_avx512(const job_t *job, float *buf) {
    const __m512 scale = _mm512_set1_ps(job->scale);
    const int64_t ldb = (job->n + 15) & ~(int64_t)15;
    int64_t r = job->row0;
    for (; r + GROUP <= job->row1; r += GROUP) backward_group(job, r, GROUP, buf, ldb, scale);
    for (; r < job->row1; r++) backward_group(job, r, 1, buf, ldb, scale);
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
        float *buf = (float *)malloc((size_t)GROUP * (((size_t)job.n + 15) & ~(size_t)15) * sizeof(float));
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

/* ---- the whole attention: products, softmax and dropout per head ----------------------------
 *
 * engine_attention_forward / _backward compute, for each (batch, head), what the engine's eager bf16
 * attention (engine/attention.py: folded_products) computes with four ATen batched products around
 * the softmax above, bit for bit:
 *   forward:  s = bf16(bf16(q k^T) * alpha) without a bias, bf16(acc * alpha + bias) with one
 *             (baddbmm; acc the float32 sum), y, z as above, out = bf16(z v)
 *   backward: dz = bf16(dout v^T), dv = bf16(z^T dout), ds from the softmax backward above, then
 *             with a bias dq = bf16(bf16(ds k) * alpha), dk = bf16(bf16(ds^T q) * alpha); without
 *             one ds' = bf16(ds * alpha), dq = bf16(ds' k), dk = bf16(ds'^T q)
 * Each product sums pairs of bf16 products in k order with the AVX-512 BF16 dot instruction from a
 * zero start, as oneDNN's kernels behind torch.bmm do on CPUs whose fastest bf16 instruction that is
 * (engine/native_softmax.py checks the results against torch.bmm when the library loads and keeps
 * ATen's products where they differ). q, k, v and the gradients stay in the linear layers' layout
 * ((batch, length, heads, head dim), any strides but a unit one for the head dim): the heads' layout
 * copies around ATen's products are gone, and each head's operands stay in cache between products. */
#ifdef HAVE_AVX512_PATH
#define ATT __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

typedef struct {
    const uint16_t *q, *k, *v;   /* (batch, heads, length, dim) at the strides below; dim stride 1 */
    const uint16_t *bias;        /* additive mask (batch, heads, length, length) at bias_s, or NULL */
    const uint8_t *keep;         /* dropout mask (batch * heads, length, length) as packed bits (mask_t) */
    const uint16_t *dout;        /* backward: the output's gradient (batch, length, heads, dim) at dout_s */
    uint16_t *y;                 /* softmax (batch * heads, length, length): forward writes, backward reads */
    uint16_t *out, *dq, *dk, *dv; /* (batch, length, heads, dim), contiguous */
    int64_t q_s[3], k_s[3], v_s[3], bias_s[3], dout_s[3]; /* strides of batch, head, position */
    int64_t batch, heads, n, d;
    float alpha, scale;
} att_t;

static inline int64_t up16(int64_t x) { return (x + 15) & ~(int64_t)15; }

/* C[m][l] = sum_p dot(A(m, p), B[p][l]) over p < P, lanes l < 16 * nz: A(m, p) the dword
   A[m * a_row + p * a_pair] (two bf16, k = 2p and 2p + 1), B rows of pair dwords */
#define TILE(RB, NZ)                                                                               \
    ATT static void tile_##RB##_##NZ(const uint32_t *A, int64_t a_row, int64_t a_pair, const uint32_t *B, \
                                     int64_t ldb, float *C, int64_t ldc, int64_t P) {              \
        __m512 acc[RB][NZ];                                                                        \
        for (int r = 0; r < RB; r++)                                                               \
            for (int z = 0; z < NZ; z++) acc[r][z] = _mm512_setzero_ps();                          \
        for (int64_t p = 0; p < P; p++) {                                                          \
            __m512i b[NZ];                                                                         \
            for (int z = 0; z < NZ; z++) b[z] = _mm512_loadu_si512(B + p * ldb + 16 * z);          \
            for (int r = 0; r < RB; r++) {                                                         \
                uint32_t a;                                                                        \
                memcpy(&a, A + r * a_row + p * a_pair, sizeof a);                                  \
                __m512bh av = (__m512bh)_mm512_set1_epi32((int)a);                                 \
                for (int z = 0; z < NZ; z++) acc[r][z] = _mm512_dpbf16_ps(acc[r][z], av, (__m512bh)b[z]); \
            }                                                                                      \
        }                                                                                          \
        for (int r = 0; r < RB; r++)                                                               \
            for (int z = 0; z < NZ; z++) _mm512_storeu_ps(C + r * ldc + 16 * z, acc[r][z]);        \
    }
TILE(8, 1) TILE(8, 2) TILE(4, 1) TILE(4, 2) TILE(4, 3) TILE(4, 4) TILE(1, 1) TILE(1, 2) TILE(1, 3) TILE(1, 4)

typedef void (*tile_t)(const uint32_t *, int64_t, int64_t, const uint32_t *, int64_t, float *, int64_t, int64_t);

/* C (M rows of ldc floats) = A B as above, for lanes 0 .. 16 * nz */
ATT static void gemm_pairs(const uint32_t *A, int64_t a_row, int64_t a_pair, const uint32_t *B, int64_t ldb,
                           float *C, int64_t ldc, int64_t M, int64_t nz, int64_t P) {
    static const tile_t eight[2] = {tile_8_1, tile_8_2}; /* 8 or 16 accumulators for narrow C */
    static const tile_t four[4] = {tile_4_1, tile_4_2, tile_4_3, tile_4_4};
    static const tile_t one[4] = {tile_1_1, tile_1_2, tile_1_3, tile_1_4};
    for (int64_t z0 = 0; z0 < nz; z0 += 4) {
        const int w = (int)(nz - z0 < 4 ? nz - z0 : 4);
        int64_t m = 0;
        if (w <= 2)
            for (; m + 8 <= M; m += 8) eight[w - 1](A + m * a_row, a_row, a_pair, B + 16 * z0, ldb, C + m * ldc + 16 * z0, ldc, P);
        for (; m + 4 <= M; m += 4) four[w - 1](A + m * a_row, a_row, a_pair, B + 16 * z0, ldb, C + m * ldc + 16 * z0, ldc, P);
        for (; m < M; m++) one[w - 1](A + m * a_row, a_row, a_pair, B + 16 * z0, ldb, C + m * ldc + 16 * z0, ldc, P);
    }
}

/* out[l] = r0[l] | r1[l] << 16 for l < n (r1 NULL: zeros), 0 for n <= l < up16(n) */
ATT static void pair_rows(const uint16_t *r0, const uint16_t *r1, int64_t n, uint32_t *out) {
    for (int64_t l = 0; l < up16(n); l += 16) {
        __mmask16 k = n - l > 0 ? lanes(n - l) : 0;
        __m512i a = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, r0 + l));
        __m512i b = r1 ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, r1 + l)) : _mm512_setzero_si512();
        _mm512_storeu_si512(out + l, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
    }
}

/* out[p][l] = the dword at rows + l * row + 2p (elements 2p, 2p + 1 of row l), l < n; 0 up to up16(n) */
ATT static void pair_columns(const uint16_t *rows, int64_t row, int64_t n, int64_t pairs, uint32_t *out) {
    const __m512i step = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32((int)(row / 2)));
    for (int64_t l = 0; l < up16(n); l += 16) {
        __mmask16 k = n - l > 0 ? lanes(n - l) : 0;
        const int *base = (const int *)(rows + l * row);
        for (int64_t p = 0; p < pairs; p++)
            _mm512_storeu_si512(out + p * up16(n) + l,
                                _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), k, step, base + p, 4));
    }
}

/* bf16 rows of `count` values from float32 rows (their rounding as products' outputs), scaled by
   alpha after rounding where alpha != 1 (a separate multiply) */
ATT static void store_rows(const float *C, int64_t ldc, int64_t rows, int64_t count, uint16_t *dst, int64_t dst_row,
                           float alpha) {
    const __m512 a = _mm512_set1_ps(alpha);
    for (int64_t i = 0; i < rows; i++)
        for (int64_t l = 0; l < count; l += 16) {
            __m512 v = round_bf16(_mm512_loadu_ps(C + i * ldc + l));
            if (alpha != 1.0f) v = round_bf16(_mm512_mul_ps(v, a));
            store_bf16(dst + i * dst_row + l, v, count - l);
        }
}

/* per-thread scratch in 4-byte words: more than the forward's or the backward's buffers take (each
   laid out at the top of forward_head / backward_head) */
static size_t scratch_words(int64_t n, int64_t d) {
    const int64_t lp = up16(n), dp = up16(d), even = n + (n & 1);
    return (size_t)((d / 2) * lp + n * (lp + dp) + (even / 2) * (lp + dp) + n * even + GROUP * lp + 256);
}

ATT static void forward_head(const att_t *a, int64_t unit, uint32_t *scratch) {
    const int64_t n = a->n, d = a->d, lp = up16(n), dp = up16(d), even = n + (n & 1), b = unit / a->heads,
                  h = unit % a->heads;
    const uint16_t *q = a->q + b * a->q_s[0] + h * a->q_s[1], *k = a->k + b * a->k_s[0] + h * a->k_s[1],
                   *v = a->v + b * a->v_s[0] + h * a->v_s[1];
    uint32_t *kp = scratch;                            /* (d / 2) x lp */
    float *s = (float *)(kp + (d / 2) * lp);           /* n x lp */
    uint32_t *vp = (uint32_t *)(s + n * lp);           /* half x dp */
    float *o = (float *)(vp + (even / 2) * dp);        /* n x dp */
    uint16_t *z = (uint16_t *)(o + n * dp);            /* n x even (+ pad) */
    float *buf = (float *)(z + n * even + 32);         /* GROUP x lp */

    pair_columns(k, a->k_s[2], n, d / 2, kp);
    gemm_pairs((const uint32_t *)q, a->q_s[2] / 2, 1, kp, lp, s, lp, n, lp / 16, d / 2);
    const __m512 alpha = _mm512_set1_ps(a->alpha), scale = _mm512_set1_ps(a->scale);
    uint16_t *y = a->y + unit * n * n;
    for (int64_t i0 = 0; i0 < n; i0 += GROUP) {
        const int rows = n - i0 < GROUP ? (int)(n - i0) : GROUP;
        __m512 vmax[GROUP];
        for (int r = 0; r < rows; r++) {
            const int64_t i = i0 + r;
            const float *row = s + i * lp;
            const uint16_t *bias = a->bias ? a->bias + b * a->bias_s[0] + h * a->bias_s[1] + i * a->bias_s[2] : NULL;
            vmax[r] = _mm512_set1_ps(-INFINITY);
            for (int64_t l = 0; l < lp; l += 16) {
                __m512 acc = _mm512_maskz_loadu_ps(lanes(n - l), row + l), sc;
                if (bias) /* baddbmm: the sum scaled, then the bias added, each in float32 */
                    sc = round_bf16(_mm512_add_ps(_mm512_mul_ps(acc, alpha), load_bf16(bias + l, n - l)));
                else /* bmm, then mul_ on its bf16 output */
                    sc = round_bf16(_mm512_mul_ps(round_bf16(acc), alpha));
                _mm512_storeu_ps(buf + r * lp + l, sc); /* as the softmax's load of the bf16 scores */
                vmax[r] = _mm512_mask_max_ps(vmax[r], lanes(n - l), vmax[r], sc);
            }
        }
        const mask_t mask = {NULL, a->keep, (unit * n + i0) * n, n};
        if (rows == GROUP)
            softmax_rows(buf, lp, vmax, GROUP, n, y + i0 * n, n, &mask, z + i0 * even, even, scale);
        else
            for (int r = 0; r < rows; r++) {
                const mask_t one = {NULL, a->keep, (unit * n + i0 + r) * n, n};
                softmax_rows(buf + r * lp, lp, vmax + r, 1, n, y + (i0 + r) * n, n, &one, z + (i0 + r) * even, even,
                             scale);
            }
    }
    if (n & 1)
        for (int64_t i = 0; i < n; i++) z[i * even + n] = 0;
    for (int64_t p = 0; p < even / 2; p++)
        pair_rows(v + 2 * p * a->v_s[2], 2 * p + 1 < n ? v + (2 * p + 1) * a->v_s[2] : NULL, d, vp + p * dp);
    gemm_pairs((const uint32_t *)z, even / 2, 1, vp, dp, o, dp, n, dp / 16, even / 2);
    store_rows(o, dp, n, d, a->out + (b * n * a->heads + h) * d, a->heads * d, 1.0f);
}

ATT static void backward_head(const att_t *a, int64_t unit, uint32_t *scratch) {
    const int64_t n = a->n, d = a->d, lp = up16(n), dp = up16(d), even = n + (n & 1), half = even / 2,
                  b = unit / a->heads, h = unit % a->heads;
    const uint16_t *q = a->q + b * a->q_s[0] + h * a->q_s[1], *k = a->k + b * a->k_s[0] + h * a->k_s[1],
                   *v = a->v + b * a->v_s[0] + h * a->v_s[1], *dout = a->dout + b * a->dout_s[0] + h * a->dout_s[1];
    const uint16_t *y = a->y + unit * n * n;
    const mask_t mask = {NULL, a->keep, unit * n * n, n};
    uint32_t *vt = scratch;                            /* (d / 2) x lp */
    float *c = (float *)(vt + (d / 2) * lp);           /* n x lp, then n x dp */
    uint32_t *pairs = (uint32_t *)(c + n * (lp > dp ? lp : dp));        /* half x lp: z, then ds, paired over rows */
    uint32_t *rows = pairs + half * lp;                /* half x dp: dout, k, q paired over rows */
    uint16_t *z = (uint16_t *)(rows + half * dp);      /* n x even */
    uint16_t *ds = z + n * even + 32;                  /* n x even */
    float *buf = (float *)(ds + n * even + 32);        /* GROUP x lp */
    const int64_t base = (b * n * a->heads + h) * d, stride = a->heads * d;
    const int scaled = a->bias != NULL; /* baddbmm scales the products' gradients; bmm().mul_() the scores' */
    const __m512 scale = _mm512_set1_ps(a->scale), alpha = _mm512_set1_ps(a->alpha);

    /* dz = dout v^T, then the softmax and dropout backward per row; z again from y and keep */
    pair_columns(v, a->v_s[2], n, d / 2, vt);
    gemm_pairs((const uint32_t *)dout, a->dout_s[2] / 2, 1, vt, lp, c, lp, n, lp / 16, d / 2);
    for (int64_t i = 0; i < n; i++)
        for (int64_t l = 0; l < n; l += 16) {
            __m512 yb = load_bf16(y + i * n + l, n - l);
            store_bf16(z + i * even + l,
                       round_bf16(_mm512_mul_ps(_mm512_mul_ps(yb, scale), mask_lanes(&mask, i, l, n))), n - l);
        }
    for (int64_t i0 = 0; i0 < n; i0 += GROUP) {
        const int rows = n - i0 < GROUP ? (int)(n - i0) : GROUP;
        for (int r = 0; r < rows; r++) /* dz rounded to bf16, as the product's output */
            for (int64_t l = 0; l < lp; l += 16)
                _mm512_storeu_ps(buf + r * lp + l, round_bf16(_mm512_maskz_loadu_ps(lanes(n - l), c + (i0 + r) * lp + l)));
        const mask_t group = {NULL, a->keep, (unit * n + i0) * n, n};
        if (rows == GROUP)
            softmax_grad_rows(buf, lp, GROUP, n, y + i0 * n, n, &group, ds + i0 * even, even, scale);
        else
            for (int r = 0; r < rows; r++) {
                const mask_t one = {NULL, a->keep, (unit * n + i0 + r) * n, n};
                softmax_grad_rows(buf + r * lp, lp, 1, n, y + (i0 + r) * n, n, &one, ds + (i0 + r) * even, even, scale);
            }
    }
    for (int64_t i = 0; i < n; i++) {
        if (!scaled)
            for (int64_t l = 0; l < n; l += 16)
                store_bf16(ds + i * even + l, round_bf16(_mm512_mul_ps(load_bf16(ds + i * even + l, n - l), alpha)), n - l);
        if (n & 1) z[i * even + n] = ds[i * even + n] = 0;
    }
    /* dv = z^T dout: z's rows paired (A), dout's rows paired (B) */
    for (int64_t p = 0; p < half; p++) {
        pair_rows(z + 2 * p * even, 2 * p + 1 < n ? z + (2 * p + 1) * even : NULL, n, pairs + p * lp);
        pair_rows(dout + 2 * p * a->dout_s[2], 2 * p + 1 < n ? dout + (2 * p + 1) * a->dout_s[2] : NULL, d, rows + p * dp);
    }
    gemm_pairs(pairs, 1, lp, rows, dp, c, dp, n, dp / 16, half);
    store_rows(c, dp, n, d, a->dv + base, stride, 1.0f);
    /* dq = ds k */
    for (int64_t p = 0; p < half; p++)
        pair_rows(k + 2 * p * a->k_s[2], 2 * p + 1 < n ? k + (2 * p + 1) * a->k_s[2] : NULL, d, rows + p * dp);
    gemm_pairs((const uint32_t *)ds, half, 1, rows, dp, c, dp, n, dp / 16, half);
    store_rows(c, dp, n, d, a->dq + base, stride, scaled ? a->alpha : 1.0f);
    /* dk = ds^T q */
    for (int64_t p = 0; p < half; p++) {
        pair_rows(ds + 2 * p * even, 2 * p + 1 < n ? ds + (2 * p + 1) * even : NULL, n, pairs + p * lp);
        pair_rows(q + 2 * p * a->q_s[2], 2 * p + 1 < n ? q + (2 * p + 1) * a->q_s[2] : NULL, d, rows + p * dp);
    }
    gemm_pairs(pairs, 1, lp, rows, dp, c, dp, n, dp / 16, half);
    store_rows(c, dp, n, d, a->dk + base, stride, scaled ? a->alpha : 1.0f);
}

ATT static int run_heads(const att_t *a, int backward, int threads) {
    const int64_t units = a->batch * a->heads;
    const size_t words = scratch_words(a->n, a->d);
    int failed = 0;
#pragma omp parallel num_threads(team_size(threads, units, 1)) reduction(| : failed)
    {
        int64_t begin, end;
        team_share(units, &begin, &end);
        uint32_t *scratch = (uint32_t *)aligned_alloc(64, (words * 4 + 63) & ~(size_t)63);
        if (scratch) {
            for (int64_t u = begin; u < end; u++) backward ? backward_head(a, u, scratch) : forward_head(a, u, scratch);
            free(scratch);
        } else {
            failed = 1;
        }
    }
    return failed ? -1 : 0;
}
#endif

/* 1 when this CPU runs engine_attention_* (AVX-512 with its BF16 dot products) */
int engine_attention_available(void) {
#ifdef HAVE_AVX512_PATH
    static int cached = -1; /* asked by every attention call: the CPU is read once */
    if (cached < 0) {
        __builtin_cpu_init();
        cached = use_avx512() && __builtin_cpu_supports("avx512bf16");
    }
    return cached;
#else
    return 0;
#endif
}

#ifdef HAVE_AVX512_PATH
/* a's strides from the caller's array (q, k, v, bias, then dout for the backward: batch, head and
   position strides of each) and its sizes from shape (batch, heads, length, dim); then the heads */
static int run_attention(att_t a, const int64_t *strides, const int64_t *shape, float alpha, float scale, int backward,
                         int threads) {
    if (!engine_attention_available()) return -2;
    for (int i = 0; i < 3; i++) {
        a.q_s[i] = strides[i], a.k_s[i] = strides[3 + i], a.v_s[i] = strides[6 + i], a.bias_s[i] = strides[9 + i];
        a.dout_s[i] = backward ? strides[12 + i] : 0;
    }
    a.batch = shape[0], a.heads = shape[1], a.n = shape[2], a.d = shape[3], a.alpha = alpha, a.scale = scale;
    return run_heads(&a, backward, threads);
}
#endif

/* Both return 0; -1 without scratch memory; -2 where this CPU lacks the kernel (see above). */
int engine_attention_forward(const uint16_t *q, const uint16_t *k, const uint16_t *v, const int64_t *strides,
                             const uint16_t *bias, const uint8_t *keep, uint16_t *y, uint16_t *out,
                             const int64_t *shape, float alpha, float scale, int threads) {
#ifdef HAVE_AVX512_PATH
    const att_t a = {.q = q, .k = k, .v = v, .bias = bias, .keep = keep, .y = y, .out = out};
    return run_attention(a, strides, shape, alpha, scale, 0, threads);
#else
    return -2;
#endif
}

int engine_attention_backward(const uint16_t *q, const uint16_t *k, const uint16_t *v, const int64_t *strides,
                              const uint16_t *bias_or_null, const uint8_t *keep, const uint16_t *y,
                              const uint16_t *dout, uint16_t *dq, uint16_t *dk, uint16_t *dv, const int64_t *shape,
                              float alpha, float scale, int threads) {
#ifdef HAVE_AVX512_PATH
    const att_t a = {.q = q, .k = k, .v = v, .bias = bias_or_null, .keep = keep, .dout = dout, .y = (uint16_t *)y,
                     .dq = dq, .dk = dk, .dv = dv};
    return run_attention(a, strides, shape, alpha, scale, 1, threads);
#else
    return -2;
#endif
}
