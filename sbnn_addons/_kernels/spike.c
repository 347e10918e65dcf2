/* Fused CPU kernels of the SBNN spike (Method page, sections 1 and 4), float32, contiguous, and
 * the window sums of the LRT variance (at the end of this file).
 *
 * Forward:  h_i = 1[U_i < Phi(z_i)],  z_i = u_i / sigma_i,  sigma_i = sqrt(var_i),
 *           U_i uniform on (0, 1); where var_i == 0 the unit is deterministic:
 *           h_i = 1[u_i > 0] (>= with at_zero).
 *           U_i is drawn lazily, exactly: U_i = (B_i + V_i) / 256 with B_i a random byte
 *           and V_i uniform. The byte alone decides h_i unless Phi(z_i) lies within the
 *           byte's cell [B_i/256, (B_i+1)/256) (up to a margin of 4e-6), which happens
 *           for about 0.4 % of the units; the byte's decision compares u |u| with
 *           tabulated quantiles times var (no square root, division or exp). Only the
 *           undecided units draw V_i and evaluate Phi exactly, in double. All bits come from Philox4x32-10 keyed by `seed`: byte i is byte
 *           i % 16 of block i / 16, V_i word i % 4 of block 2^62 + i / 4. A draw depends
 *           on (seed, i) only, never on threads or chunking.
 * Backward: the IW-ST Jacobian J(h) of sbnn_addons.functional.estimator_jacobian, and
 *           grad_u = g J,  grad_var = -z g J / (2 sigma)  (0 where var == 0).
 *
 * Built by sbnn_addons.kernels with -O3 -ffast-math (compiled, then linked without it so
 * that crtfastmath does not switch the process to flush-to-zero). Every division and
 * exp has a guarded argument, so no inf or NaN enters the vectorised loops.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define CHUNK 1024 /* elements per buffer of random bytes (multiple of 16) */
#define INV_SQRT2 0.70710678118654752440f
#define INV_SQRT_2PI 0.39894228040143267794f
#define SIGMA_MIN 1e-6f
#define Z_MAX 40.0f
#define AUX_PULL_Z 3.0f /* tensors.AUX_PULL_Z_MAX */
#define V_STREAM (1ULL << 62) /* first Philox counter of the V stream */

/* Philox4x32-10 (Salmon et al. 2011) of counters block0 .. block0 + nblocks - 1 into
 * out[4 b .. 4 b + 3], written so that the compiler runs one block per SIMD lane (the
 * rounds unrolled, the round keys k + r * constant). */
/* noinline: inlined into the OpenMP region, the block loop is no longer vectorised */
__attribute__((noinline)) static void philox_blocks(uint32_t *restrict out, int64_t nblocks,
                                                    uint64_t block0, uint64_t key) {
    const uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
    for (int64_t b = 0; b < nblocks; ++b) {
        uint64_t counter = block0 + (uint64_t)b;
        uint32_t x0 = (uint32_t)counter, x1 = (uint32_t)(counter >> 32), x2 = 0, x3 = 0;
#pragma GCC unroll 10
        for (int r = 0; r < 10; ++r) {
            uint32_t rk0 = k0 + (uint32_t)r * 0x9E3779B9u, rk1 = k1 + (uint32_t)r * 0xBB67AE85u;
            uint64_t p0 = (uint64_t)0xD2511F53u * x0;
            uint64_t p1 = (uint64_t)0xCD9E8D57u * x2;
            uint32_t y0 = (uint32_t)(p1 >> 32) ^ x1 ^ rk0;
            uint32_t y2 = (uint32_t)(p0 >> 32) ^ x3 ^ rk1;
            x1 = (uint32_t)p1;
            x3 = (uint32_t)p0;
            x0 = y0;
            x2 = y2;
        }
        out[4 * b] = x0;
        out[4 * b + 1] = x1;
        out[4 * b + 2] = x2;
        out[4 * b + 3] = x3;
    }
}

/* The random bytes of elements c0 .. c0 + n - 1 (c0 a multiple of 16): byte j of block b is
 * byte j % 4, little end first, of word j / 4. */
static void random_bytes(int32_t *restrict out, uint32_t *restrict words, int64_t n,
                         uint64_t c0, uint64_t key) {
    int64_t nblocks = (n + 15) / 16;
    philox_blocks(words, nblocks, c0 / 16, key);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    const uint8_t *bytes = (const uint8_t *)words;
    for (int64_t i = 0; i < 16 * nblocks; ++i) out[i] = bytes[i];
#else
    for (int64_t i = 0; i < 16 * nblocks; ++i) out[i] = (words[i >> 2] >> (8 * (i & 3))) & 255u;
#endif
}

/* The byte B decides U = (B + V) / 256 < Phi(z) unless Phi(z) is within PHI_MARGIN of the
 * byte's cell [B/256, (B+1)/256). In the sign-square form s(t) = t |t|, which needs neither
 * the square root nor a division (s(u) >= s(t) var  <=>  u / sqrt(var) >= t):
 *   fire for sure    where s(u) >= FIRE_Q[B] var,    FIRE_Q[B] = s(Phi^-1((B+1)/256 + margin))
 *   silent for sure  where s(u) <= SILENT_Q[B] var,  SILENT_Q[B] = s(Phi^-1(B/256 - margin))
 * (never for B = 255 and B = 0 respectively). The margin covers the float rounding of the
 * products (relative 3e-7 in z, at most 1e-7 in Phi) many times over; the undecided
 * fraction is 1/256 + 2 margin, about 0.4 %. Outside var in [VAR_LO, VAR_HI] and
 * |u| <= U_HI the products could lose precision, so those units are always undecided. */
#define PHI_MARGIN 4e-6
#define VAR_LO 1e-30f
#define VAR_HI 1e30f
#define U_HI 1e15f
#define UNDECIDED 2.0f
static float FIRE_Q[256], SILENT_Q[256];

static double ndtr(double t) { return 0.5 * erfc(-t * 0.70710678118654752440); }

static double ndtri(double p) { /* bisection: 100 halvings of [-40, 40] reach double ulp */
    double lo = -40.0, hi = 40.0;
    for (int k = 0; k < 100; ++k) {
        double mid = 0.5 * (lo + hi);
        if (ndtr(mid) < p) lo = mid; else hi = mid;
    }
    return 0.5 * (lo + hi);
}

/* Fill the threshold tables (called once when the library is loaded). */
void sbnn_init(void) {
    for (int b = 0; b < 256; ++b) {
        double fire = b < 255 ? ndtri((b + 1) / 256.0 + PHI_MARGIN) : 0.0;
        double silent = b > 0 ? ndtri(b / 256.0 - PHI_MARGIN) : 0.0;
        FIRE_Q[b] = (float)(fire * fabs(fire));
        SILENT_Q[b] = (float)(silent * fabs(silent));
    }
}

/* Copy the tables out (for the tests). */
void sbnn_thresholds(float *fire, float *silent) {
    for (int b = 0; b < 256; ++b) {
        fire[b] = FIRE_Q[b];
        silent[b] = SILENT_Q[b];
    }
}

static inline float fire_by_byte(float x, float v, int byte, int at_zero) {
    float sx = x * fabsf(x);
    int usable = (v >= VAR_LO) & (v <= VAR_HI) & (fabsf(x) <= U_HI);
    int fire = usable & (byte != 255) & (sx >= FIRE_Q[byte] * v);
    int silent = usable & (byte != 0) & (sx <= SILENT_Q[byte] * v);
    float sampled = fire ? 1.0f : (silent ? 0.0f : UNDECIDED);
    float det = at_zero ? (float)(x >= 0.0f) : (float)(x > 0.0f);
    return v > 0.0f ? sampled : det;
}

/* fire_by_byte over n units. noinline and restrict: inside the OpenMP region the compiler
 * cannot rule out that h aliases the tables and leaves the loop scalar. */
__attribute__((noinline)) static void decide_by_bytes(const float *restrict u,
                                                      const float *restrict v,
                                                      const int32_t *restrict byte,
                                                      float *restrict h, int64_t n, int at_zero) {
    if (at_zero) /* one loop per constant value, each vectorised */
        for (int64_t i = 0; i < n; ++i) h[i] = fire_by_byte(u[i], v[i], byte[i], 1);
    else
        for (int64_t i = 0; i < n; ++i) h[i] = fire_by_byte(u[i], v[i], byte[i], 0);
}

/* The exact decisions for the nu undecided units idx[0 .. nu) of a chunk starting at
 * element c0: U = (byte + V) / 256 against Phi(z), in double. In batches, so that Phi
 * (erfc) runs as one loop, which the compiler vectorises with the vector math library
 * where it has one. */
#define EXACT_BATCH 64
static void decide_exact(const int32_t *restrict idx, int64_t nu, const float *restrict uc,
                         const float *restrict vc, const int32_t *restrict B,
                         float *restrict hc, int64_t c0, uint64_t seed) {
    for (int64_t k0 = 0; k0 < nu; k0 += EXACT_BATCH) {
        int64_t m = nu - k0 < EXACT_BATCH ? nu - k0 : EXACT_BATCH;
        double t[EXACT_BATCH], p[EXACT_BATCH];
        for (int64_t k = 0; k < m; ++k) {
            int64_t i = idx[k0 + k];
            double z = (double)uc[i] / sqrt((double)vc[i]);
            t[k] = -fmin(fmax(z, -40.0), 40.0) * 0.70710678118654752440;
        }
        for (int64_t k = 0; k < m; ++k) p[k] = 0.5 * erfc(t[k]); /* Phi(z) */
        for (int64_t k = 0; k < m; ++k) {
            int64_t i = idx[k0 + k], e = c0 + i;
            uint32_t r[4];
            philox_blocks(r, 1, V_STREAM + (uint64_t)e / 4, seed);
            double V = ((double)r[e & 3] + 0.5) * 0x1.0p-32;
            hc[i] = (float)(((double)B[i] + V) * (1.0 / 256.0) < p[k]);
        }
    }
}

/* The variance of element e is var[(e / (mid * inner)) * inner + e % inner]: mid = 1 is a
 * full-shape variance, and mid > 1 a variance broadcast over a block of `mid` middle
 * positions (e.g. [N, 1, H, W] against [N, C, H, W]: mid = C, inner = H W; one element:
 * mid = n, inner = 1). Returns a pointer to the variances of elements c0 .. c0 + n - 1,
 * gathered into `buf` unless they are contiguous in `var`. */
static const float *variance_run(const float *restrict var, int64_t mid, int64_t inner,
                                 int64_t c0, int64_t n, float *restrict buf) {
    if (mid == 1) return var + c0;
    for (int64_t i = 0, e = c0; i < n;) {
        int64_t outer = e / (mid * inner), k = e % inner, len;
        if (inner == 1) { /* one value repeated over the rest of its block of mid */
            len = mid - e % mid;
            len = len < n - i ? len : n - i;
            float v = var[outer];
            for (int64_t j = 0; j < len; ++j) buf[i + j] = v;
        } else { /* a contiguous row of inner values */
            len = inner - k < n - i ? inner - k : n - i;
            const float *src = var + outer * inner + k;
            for (int64_t j = 0; j < len; ++j) buf[i + j] = src[j];
        }
        i += len;
        e += len;
    }
    return buf;
}

/* z^2 = ((u + offset) / max(sigma, SIGMA_MIN))^2 of the auxiliary loss (Method page, section 5),
 * 0 where var == 0. */
static inline float aux_z(float x, float v, float offset) {
    return (x + offset) / fmaxf(sqrtf(fmaxf(v, 0.0f)), SIGMA_MIN);
}

/* Chunks of CHUNK elements are spread over `threads` OpenMP threads when there are at
 * least PARALLEL_MIN elements per thread. Built against the OpenMP runtime torch has
 * already loaded (same soname), so the threads are torch's own intra-op pool. */
#define PARALLEL_MIN ((int64_t)1 << 13)

/* The spikes of elements c0 .. c0 + n - 1 (one chunk, n <= CHUNK) for the drives uc and
 * variances vc of those elements, into hc (float) and hbc (bytes, unless NULL). Returns
 * the chunk's sum of z^2 over the noisy units when `want_aux`, else 0. */
static double spike_chunk(const float *restrict uc, const float *restrict vc, float *restrict hc,
                          uint8_t *restrict hbc, int64_t c0, int64_t n, uint64_t seed,
                          int at_zero, int want_aux, float offset) {
    int32_t B[CHUNK]; /* the random bytes, widened to table indices */
    uint32_t W[CHUNK / 4];
    int32_t idx[CHUNK]; /* the undecided units */
    int64_t nu = 0;
    random_bytes(B, W, n, (uint64_t)c0, seed);
    decide_by_bytes(uc, vc, B, hc, n, at_zero);
    int64_t b0 = 0;
#if defined(__AVX512F__)
    /* blocks of 16: one compare into a mask, the undecided units read from its bits */
    for (; b0 + 16 <= n; b0 += 16) {
        unsigned k = _mm512_cmp_ps_mask(_mm512_loadu_ps(hc + b0), _mm512_set1_ps(UNDECIDED),
                                        _CMP_EQ_OQ);
        for (; k; k &= k - 1) idx[nu++] = (int32_t)(b0 + __builtin_ctz(k));
    }
#endif
    for (int64_t b = b0; b < n; b += 16) { /* blocks of 16: a vectorised test first */
        int64_t m = n - b < 16 ? n - b : 16;
        int any = 0;
        for (int64_t j = 0; j < m; ++j) any |= hc[b + j] == UNDECIDED;
        if (!any) continue;
        for (int64_t i = b; i < b + m; ++i)
            if (hc[i] == UNDECIDED) idx[nu++] = (int32_t)i;
    }
    if (nu) decide_exact(idx, nu, uc, vc, B, hc, c0, seed);
    if (hbc)
        for (int64_t i = 0; i < n; ++i) hbc[i] = (uint8_t)hc[i];
    double aux = 0.0;
    if (want_aux) {
        float acc = 0.0f;
        for (int64_t i = 0; i < n; ++i) {
            float z = aux_z(uc[i], vc[i], offset);
            acc += vc[i] > 0.0f ? z * z : 0.0f;
        }
        aux = acc;
    }
    return aux;
}

static double forward_chunks(const float *restrict x, const float *restrict m,
                             const float *restrict r, const float *restrict var, int64_t mid,
                             int64_t inner, int step, float beta, float theta, int reset,
                             float *restrict u, float *restrict h, uint8_t *restrict hb,
                             float *restrict m_out, int64_t total, uint64_t seed, int at_zero,
                             int want_aux, float offset, int threads);

/* Spikes for the n elements. `h` receives them as float and, when `hb` is not NULL, as
 * bytes; one of them may be NULL. Returns the sum of z^2 over the noisy units when `want_aux`, else 0. */
double sbnn_spike_forward(const float *restrict u, const float *restrict var, int64_t mid,
                          int64_t inner, float *restrict h, uint8_t *restrict hb, int64_t total,
                          uint64_t seed, int at_zero, int want_aux, float offset,
                          int threads) {
    return forward_chunks(u, NULL, NULL, var, mid, inner, 0, 0.0f, 0.0f, 2, NULL, h, hb, NULL,
                          total, seed, at_zero, want_aux, offset, threads);
}

/* ---------------------------------------------------------------- one LIF step
 * The core LIF's step fused into one pass (reset: 0 "subtract", 1 "zero", 2 "none"):
 *   H = beta m + x  (m == NULL: the zero initial state, H = x),  u = H - theta,
 *   and with r (snnTorch's order: the previous step's spikes subtracted at the charge)
 *   H = (beta m + x) - r theta,
 *   h = the spike of sbnn_spike_forward for (u, var) (same draws for the same seed),
 *   m' = H - theta h,  H (1 - h),  or H.
 * The arithmetic is that of the step-by-step PyTorch operations (no contraction into a
 * fused multiply-add), so the membranes and spikes equal theirs bitwise. */
#if defined(__clang__)
#define NO_CONTRACT
#elif defined(__GNUC__)
#define NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define NO_CONTRACT
#endif

NO_CONTRACT static void lif_charge(const float *restrict x, const float *restrict m,
                                   const float *restrict r, float beta, float theta,
                                   float *restrict H, float *restrict u, int64_t n) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
    if (m)
        for (int64_t i = 0; i < n; ++i) {
            float decayed = beta * m[i];
            H[i] = decayed + x[i];
        }
    else
        for (int64_t i = 0; i < n; ++i) H[i] = x[i];
    if (r)
        for (int64_t i = 0; i < n; ++i) {
            float subtracted = r[i] * theta;
            H[i] = H[i] - subtracted;
        }
    for (int64_t i = 0; i < n; ++i) u[i] = H[i] - theta;
}

NO_CONTRACT static void lif_reset(float *restrict H, const float *restrict h, float theta,
                                  int reset, int64_t n) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
    if (reset == 0)
        for (int64_t i = 0; i < n; ++i) H[i] = H[i] - theta * h[i];
    else if (reset == 1)
        for (int64_t i = 0; i < n; ++i) H[i] = H[i] * (1.0f - h[i]);
}

/* The forward over all chunks, spread over the threads. With `step`, a LIF step: the
 * charge (x, m -> H in m_out, u) first and the reset of m_out after; otherwise the drive
 * is x itself (u, m and m_out unused). hb may be NULL (no bytes), and h without `step` (the
 * bytes alone). */
static double forward_chunks(const float *restrict x, const float *restrict m,
                             const float *restrict r, const float *restrict var, int64_t mid,
                             int64_t inner, int step, float beta, float theta, int reset,
                             float *restrict u, float *restrict h, uint8_t *restrict hb,
                             float *restrict m_out, int64_t total, uint64_t seed, int at_zero,
                             int want_aux, float offset, int threads) {
    double aux = 0.0;
    int64_t chunks = (total + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(+ : aux) \
    if (threads > 1 && total >= PARALLEL_MIN * threads)
    for (int64_t c = 0; c < chunks; ++c) {
        float VB[CHUNK], HC[CHUNK];
        int64_t c0 = c * CHUNK;
        int64_t n = total - c0 < CHUNK ? total - c0 : CHUNK;
        if (step)
            lif_charge(x + c0, m ? m + c0 : NULL, r ? r + c0 : NULL, beta, theta, m_out + c0,
                       u + c0, n);
        const float *vc = variance_run(var, mid, inner, c0, n, VB);
        aux += spike_chunk(step ? u + c0 : x + c0, vc, h ? h + c0 : HC, hb ? hb + c0 : NULL, c0,
                           n, seed, at_zero, want_aux, offset);
        if (step) lif_reset(m_out + c0, h + c0, theta, reset, n);
    }
    return aux;
}

/* Writes u (kept for the backward), h, hb (unless NULL) and the new membrane m_out; m and r
 * may be NULL. */
double sbnn_lif_step_forward(const float *restrict x, const float *restrict m,
                             const float *restrict r, const float *restrict var, int64_t mid,
                             int64_t inner, float beta, float theta, int reset, float *restrict u,
                             float *restrict h, uint8_t *restrict hb, float *restrict m_out,
                             int64_t total, uint64_t seed, int at_zero, int want_aux,
                             float offset, int threads) {
    return forward_chunks(x, m, r, var, mid, inner, 1, beta, theta, reset, u, h, hb, m_out,
                          total, seed, at_zero, want_aux, offset, threads);
}

/* The vector math of libmvec leaves its fast path for exp arguments below -87, so the
 * Gaussians are computed only down to that and set to exactly 0 beyond. */
#define GAUSS_CUT 13.19f /* exp(-13.19^2 / 2) = 1.6e-38, the smallest normal float */

/* exp(-y^2 / 2) = phi(y) sqrt(2 pi), exactly 0 where it would underflow. */
static inline float gauss(float y) {
    float e = expf(fmaxf(-0.5f * y * y, -87.0f));
    return fabsf(y) < GAUSS_CUT ? e : 0.0f;
}

/* erfcx(x) = exp(x^2) erfc(x) for 0 <= x <= 30 as t Q(t), t = 1 / (1 + x/2), with Q the
 * degree-10 polynomial fitted to torch.special.erfcx (relative least squares on
 * t in [1/16, 1], by fit_erfcx.py); relative error below 6e-7 in float32 (tested). No exp and
 * no underflow: Phi(y) = exp(-y^2/2) erfcx(|y| / sqrt 2) / 2 for y <= 0, so the ratios
 * of the importance weights below are formed with the Gaussian factors cancelled. */
static inline float erfcx_pos(float x) {
    float t = 1.0f / (1.0f + 0.5f * x);
    float q = 4.419942302e-02f;
    q = q * t - 2.397422274e-01f;
    q = q * t + 5.043010118e-01f;
    q = q * t - 4.673743396e-01f;
    q = q * t + 1.408857410e-01f;
    q = q * t - 6.294368752e-02f;
    q = q * t + 9.440110261e-02f;
    q = q * t + 1.751955894e-01f;
    q = q * t + 2.468882663e-01f;
    q = q * t + 2.820943725e-01f;
    q = q * t + 2.820947546e-01f;
    return t * q;
}

/* The replacement Jacobian times sigma, J(h) sigma, at z (clamped to [-Z_MAX, Z_MAX]),
 * with y = s z, s = 2h - 1, so that P(h) = Phi(y) (Method page, section 4):
 *   ST:        phi(z)
 *   IW-ST(p):  min((1 - p) phi(z) + p phi(z) Phi(0) / Phi(y),  max_weight phi(z))
 *   AGR(tau):  min(phi(z/r) Phi(c y) / Phi(y),  max_weight phi(z/r)) / r,
 *              r = sqrt(1 + tau^2), c = tau / r   (c^2 + 1/r^2 = 1)
 * For y <= 0 (the less probable outcome): Phi(c y) / Phi(y) phi(y/r) = erfcx(c a) /
 * (erfcx(a) sqrt(2 pi)), a = |y| / sqrt 2 (the exponentials cancel); IW-ST is c = 0,
 * r = 1. For y > 0, Phi(y) = 1 - exp(-y^2/2) erfcx(a) / 2 lies in [1/2, 1]. */
static inline float jacobian(float zc, float h, int kind, float p, float tau,
                             float max_weight) {
    if (kind == 0) return gauss(zc) * INV_SQRT_2PI;
    float y = h > 0.5f ? zc : -zc;
    float a = fabsf(y) * INV_SQRT2;
    if (kind == 1) {
        float big = gauss(y); /* exp(-y^2/2) */
        float phi = big * INV_SQRT_2PI;
        float ex = erfcx_pos(a);
        float weighted = y <= 0.0f ? INV_SQRT_2PI / ex : 0.5f * phi / (1.0f - 0.5f * big * ex);
        return p > 0.0f ? fminf((1.0f - p) * phi + p * weighted, max_weight * phi) : phi;
    }
    float r = sqrtf(1.0f + tau * tau), c = tau / r;
    float g_r = gauss(y / r);     /* exp(-y^2 / (2 r^2)) */
    float g_c = gauss(c * y);     /* exp(-c^2 y^2 / 2) */
    float ex = erfcx_pos(a), ex_c = erfcx_pos(c * a);
    float weighted = y <= 0.0f
        ? ex_c / ex * INV_SQRT_2PI
        : (1.0f - 0.5f * g_c * ex_c) / (1.0f - 0.5f * g_c * g_r * ex) * g_r * INV_SQRT_2PI;
    return fminf(weighted, max_weight * g_r * INV_SQRT_2PI) / r;
}

/* Whether x is NaN, from its bits: -ffast-math (finite math only) folds x != x to 0. */
static inline int is_nan(float x) {
    union { float f; uint32_t u; } b = {x};
    return (b.u & 0x7fffffffu) > 0x7f800000u;
}

/* kind: 0 = ST, 1 = IW-ST(p), 2 = AGR(tau). */
static inline void grad_one(float g, float x, float v, float h, int kind, int aux, float p,
                            float tau, float max_weight, float g_aux, float offset, float pull,
                            float *gu, float *gv) {
    float sr = sqrtf(fmaxf(v, 0.0f));
    float s = fmaxf(sr, SIGMA_MIN);
    float inv_s = 1.0f / s;
    float z = fminf(fmaxf(x * inv_s, -1e4f), 1e4f);
    float zc = fminf(fmaxf(z, -Z_MAX), Z_MAX);
    float a = g * jacobian(zc, h, kind, p, tau, max_weight) * inv_s;
    int noisy = v > 0.0f;
    /* the auxiliary pull (IWSTSpike.aux_pull): pull = 2 w mean|dL/dh|, times
     * clamp(z, -AUX_PULL_Z, AUX_PULL_Z) / sigma; 0 without noise */
    float grad_u = noisy ? a + pull * fminf(fmaxf(z, -AUX_PULL_Z), AUX_PULL_Z) * inv_s : 0.0f;
    float grad_v = noisy && sr > 0.0f ? -z * a * 0.5f / fmaxf(sr, 1e-30f) : 0.0f;
    /* auxiliary loss: d z^2/du = 2 z / s, d z^2/dvar = -z^2 / var (0 where s is clamped);
     * aux 1: both, aux 2: the membrane's only (sigma held constant in z) */
    if (aux) {
        float za = aux_z(x, v, offset);
        grad_u += noisy ? g_aux * 2.0f * za * inv_s : 0.0f;
        grad_v += aux == 1 && noisy && sr >= SIGMA_MIN ? -g_aux * za * za / fmaxf(v, 1e-30f)
                                                       : 0.0f;
    }
    /* a NaN drive or variance gets NaN gradients, as on the PyTorch path and through the
     * hosts' surrogates: the clamps above (fminf / fmaxf) would turn it into a bound */
    if (is_nan(x) | is_nan(v)) {
        union { uint32_t u; float f; } q = {0x7fc00000u};
        grad_u = q.f;
        grad_v = q.f;
    }
    *gu = grad_u;
    *gv = grad_v;
}

/* The arguments of a backward: the spike's (g, u, var, h -> gu, grad_var) and, for a
 * fused LIF step (`step`), the membrane's: g is then dL/dh (NULL: 0), g_m = dL/dm' (NULL:
 * 0), gu receives dL/dx and g_mprev (unless NULL) dL/dm = beta dL/dx. */
typedef struct {
    const float *g, *u, *var, *g_m;
    const void *h; /* the spikes: uint8, or float with h_float */
    float *gu, *g_mprev;
    int64_t mid, inner;
    int kind, step, reset, h_float;
    float p, tau, max_weight, g_aux, offset, beta, theta;
    int aux_var; /* the aux loss's gradient reaches the variance (else the membrane only) */
    float pull;  /* 2 w mean|dL/dh| of the auxiliary pull (0: none) */
} bwd_args;

/* grad_one over n elements (grad_u into gu, the per-element grad_var into gv; h: the
 * spikes as bytes), one loop per estimator kind and aux flag (constants, so
 * that each loop is vectorised); noinline with restrict pointers, so that the compiler
 * knows the outputs do not alias the inputs. */
#define BACKWARD_LOOP(KIND, AUX)                                                             \
    for (int64_t i = 0; i < n; ++i)                                                          \
        grad_one(g[i], u[i], v[i], (float)h[i], KIND, AUX, a->p, a->tau, a->max_weight,      \
                 a->g_aux, a->offset, a->pull, gu + i, gv + i);

#define BACKWARD_KINDS(AUX)                                                                  \
    if (a->kind == 0) {                                                                      \
        BACKWARD_LOOP(0, AUX)                                                                \
    } else if (a->kind == 1) {                                                               \
        BACKWARD_LOOP(1, AUX)                                                                \
    } else {                                                                                 \
        BACKWARD_LOOP(2, AUX)                                                                \
    }

__attribute__((noinline)) static void backward_loop(const bwd_args *restrict a,
                                                    const float *restrict g,
                                                    const float *restrict u,
                                                    const float *restrict v,
                                                    const uint8_t *restrict h,
                                                    float *restrict gu, float *restrict gv,
                                                    int64_t n) {
    if (a->g_aux != 0.0f && a->aux_var) {
        BACKWARD_KINDS(1)
    } else if (a->g_aux != 0.0f) {
        BACKWARD_KINDS(2)
    } else {
        BACKWARD_KINDS(0)
    }
}

/* dL/dh of a LIF step, through the reset too: m' = H - theta h gives -theta dL/dm',
 * m' = H (1 - h) gives -H dL/dm' (H = u + theta). */
static void step_spike_grad(const bwd_args *restrict a, int64_t c0, int64_t n,
                            float *restrict G) {
    const float *uc = a->u + c0;
    for (int64_t i = 0; i < n; ++i) {
        float gh = a->g ? a->g[c0 + i] : 0.0f, gm = a->g_m ? a->g_m[c0 + i] : 0.0f;
        G[i] = a->reset == 0 ? gh - a->theta * gm
             : a->reset == 1 ? gh - (uc[i] + a->theta) * gm : gh;
    }
}

/* dL/dx = dL/dH = dL/du + dm'/dH dL/dm' (dm'/dH = 1 - h for the zero reset, else 1), in
 * place of dL/du, and dL/dm = beta dL/dx. */
static void step_input_grad(const bwd_args *restrict a, int64_t c0, int64_t n,
                            const uint8_t *restrict hc) {
    float *gx = a->gu + c0;
    if (a->g_m)
        for (int64_t i = 0; i < n; ++i) {
            float gm = a->g_m[c0 + i];
            gx[i] += a->reset == 1 && hc[i] ? 0.0f : gm;
        }
    if (a->g_mprev)
        for (int64_t i = 0; i < n; ++i) a->g_mprev[c0 + i] = a->beta * gx[i];
}

/* The auxiliary pull's factor 2 w mean|G| (IWSTSpike.aux_pull) over all elements of
 * G = dL/dh (a LIF step's through its reset), 0 where w or the size is 0: per chunk a
 * float sum, summed over the chunks in double. */
static float pull_factor(const bwd_args *a, float w, int64_t total, int threads) {
    if (w == 0.0f || total == 0 || (!a->step && !a->g)) return 0.0f;
    double acc = 0.0;
    int64_t chunks = (total + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(+ : acc) \
    if (threads > 1 && total >= PARALLEL_MIN * threads)
    for (int64_t c = 0; c < chunks; ++c) {
        float G[CHUNK];
        int64_t c0 = c * CHUNK;
        int64_t n = total - c0 < CHUNK ? total - c0 : CHUNK;
        const float *gc = a->g + c0;
        if (a->step) {
            step_spike_grad(a, c0, n, G);
            gc = G;
        }
        float sum = 0.0f;
        for (int64_t i = 0; i < n; ++i) sum += fabsf(gc[i]);
        acc += sum;
    }
    return (float)(2.0 * (double)w * acc / (double)total);
}

static void backward_chunk(const bwd_args *restrict a, int64_t c0, int64_t n,
                           float *restrict gv) {
    float VB[CHUNK], G[CHUNK];
    uint8_t HB[CHUNK];
    const float *uc = a->u + c0, *gc = G;
    const float *vc = variance_run(a->var, a->mid, a->inner, c0, n, VB);
    const uint8_t *hc = HB;
    if (a->h_float) { /* as bytes: the loop below runs faster on them than on floats */
        const float *hf = (const float *)a->h + c0;
        for (int64_t i = 0; i < n; ++i) HB[i] = (uint8_t)(hf[i] > 0.5f);
    } else {
        hc = (const uint8_t *)a->h + c0;
    }
    if (a->step)
        step_spike_grad(a, c0, n, G);
    else
        gc = a->g + c0;
    backward_loop(a, gc, uc, vc, hc, a->gu + c0, gv, n);
    if (a->step) step_input_grad(a, c0, n, hc);
}

/* grad_var written in full (shape of u); the caller sums it over a broadcast. */
static void backward_full(const bwd_args *a, float *restrict gv, int64_t total, int threads) {
    int64_t chunks = (total + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static) num_threads(threads) \
    if (threads > 1 && total >= PARALLEL_MIN * threads)
    for (int64_t c = 0; c < chunks; ++c) {
        int64_t c0 = c * CHUNK;
        int64_t n = total - c0 < CHUNK ? total - c0 : CHUNK;
        backward_chunk(a, c0, n, gv + c0);
    }
}

/* grad_var summed over its broadcast block in the kernel: `gvar` has the variance's own
 * size, (total / (mid * inner)) * inner. Each outer block of mid * inner elements belongs
 * to one thread, so the sums need no atomics (with a single outer block, use the full
 * backward and a sum over the broadcast instead). */
static void backward_compact(const bwd_args *a, float *restrict gvar, int64_t total,
                             int threads) {
    int64_t mid = a->mid, inner = a->inner, block = mid * inner, outer = total / block;
#pragma omp parallel for schedule(static) num_threads(threads) \
    if (threads > 1 && total >= PARALLEL_MIN * threads)
    for (int64_t o = 0; o < outer; ++o) {
        float GV[CHUNK];
        float *acc = gvar + o * inner;
        for (int64_t k = 0; k < inner; ++k) acc[k] = 0.0f;
        int64_t end = (o + 1) * block;
        for (int64_t c0 = o * block; c0 < end; c0 += CHUNK) {
            int64_t n = end - c0 < CHUNK ? end - c0 : CHUNK;
            backward_chunk(a, c0, n, GV);
            if (inner == 1) { /* one variance per block: a plain sum */
                float sum = 0.0f;
                for (int64_t i = 0; i < n; ++i) sum += GV[i];
                acc[0] += sum;
            } else { /* runs of at most `inner` elements, each added to acc[k ...] */
                for (int64_t i = 0, k = (c0 - o * block) % inner; i < n; k = 0) {
                    int64_t len = inner - k < n - i ? inner - k : n - i;
                    for (int64_t j = 0; j < len; ++j) acc[k + j] += GV[i + j];
                    i += len;
                }
            }
        }
    }
}

/* g_aux: gradient of the loss with respect to the forward's sum of z^2 (0: no aux loss);
 * aux_var: whether that gradient also reaches the variance (else sigma is held constant in
 * z and only u receives it). h: the spikes, float with h_float, else uint8. grad_var is
 * written in full (shape of u); the caller sums it over a broadcast. pull_weight: w of the
 * auxiliary pull, whose factor 2 w mean|g| the backward computes first (pull_factor). */
void sbnn_spike_backward(const float *restrict g, const float *restrict u,
                         const float *restrict var, int64_t mid, int64_t inner,
                         const void *restrict h, int h_float, float *restrict gu,
                         float *restrict gv, int64_t total, int kind, float p, float tau,
                         float max_weight, float g_aux, float offset, int aux_var,
                         float pull_weight, int threads) {
    bwd_args a = {g, u, var, NULL, h, gu, NULL, mid, inner, kind, 0, 0, h_float,
                  p, tau, max_weight, g_aux, offset, 0.0f, 0.0f, aux_var, 0.0f};
    a.pull = pull_factor(&a, pull_weight, total, threads);
    backward_full(&a, gv, total, threads);
}

/* The same backward with grad_var of the variance's own size (see backward_compact). */
void sbnn_spike_backward_compact(const float *restrict g, const float *restrict u,
                                 const float *restrict var, int64_t mid, int64_t inner,
                                 const void *restrict h, int h_float, float *restrict gu,
                                 float *restrict gvar, int64_t total, int kind, float p,
                                 float tau, float max_weight, float g_aux, float offset,
                                 int aux_var, float pull_weight, int threads) {
    bwd_args a = {g, u, var, NULL, h, gu, NULL, mid, inner, kind, 0, 0, h_float,
                  p, tau, max_weight, g_aux, offset, 0.0f, 0.0f, aux_var, 0.0f};
    a.pull = pull_factor(&a, pull_weight, total, threads);
    backward_compact(&a, gvar, total, threads);
}

/* The backward of sbnn_lif_step_forward: g_h = dL/dh and g_m = dL/dm' (either NULL: 0)
 * give g_x = dL/dx, g_mprev = dL/dm (unless NULL) and grad_var (compact as in
 * sbnn_spike_backward_compact when `compact`, else in full); h: the spikes, float. */
void sbnn_lif_step_backward(const float *restrict g_h, const float *restrict g_m,
                            const float *restrict u, const float *restrict var, int64_t mid,
                            int64_t inner, const float *restrict h, float beta, float theta,
                            int reset, float *restrict g_x, float *restrict g_mprev,
                            float *restrict gv, int compact, int64_t total, int kind, float p,
                            float tau, float max_weight, float g_aux, float offset,
                            int aux_var, float pull_weight, int threads) {
    bwd_args a = {g_h, u, var, g_m, h, g_x, g_mprev, mid, inner, kind, 1, reset, 1,
                  p, tau, max_weight, g_aux, offset, beta, theta, aux_var, 0.0f};
    a.pull = pull_factor(&a, pull_weight, total, threads);
    if (compact)
        backward_compact(&a, gv, total, threads);
    else
        backward_full(&a, gv, total, threads);
}

/* ---------------------------------------------------------------- window sums
 * out[m, i, j] = scale * sum_{c < C} sum_{a < kh, b < kw} f(x[m, c, i sh + a - ph, j sw + b - pw])
 * over zero-padded windows, f(v) = v (or v * v with `square`); x is [M, C, H, W] and out
 * [M, Ho, Wo], both contiguous (1-D windows: H = Ho = kh = 1). This is the receptive-field
 * sum of the LRT variance (all C channels, one output channel) and the window sum of the
 * average-pooling variance rule (C = 1).
 *
 * Each plane is summed over the channels into a zero-padded buffer P of Hp x Wp
 * (Hp = H + 2 ph, Wp = W + 2 pw), and the window sums are taken on P flattened: the row
 * sums R[e] = sum_b P[e + b] and the column sums Q[e] = sum_a R[e + a Wp] are each one long
 * contiguous loop per tap (vectorised), whatever the plane's width. A flat index e that
 * wraps into the next row only feeds positions that no window reads. Then
 * out[i, j] = scale Q[i sh Wp + j sw]. The transposed sum (the backward) runs the same
 * steps backwards. Every output depends on one m only: the result does not depend on the
 * thread count. */
static void window_taps(float *restrict dst, const float *restrict src, int64_t n,
                        int64_t taps, int64_t step) {
    /* dst[e] = sum_{t < taps} src[e + t step], e < n */
    for (int64_t e = 0; e < n; ++e) dst[e] = src[e];
    for (int64_t t = 1; t < taps; ++t) {
        const float *s = src + t * step;
        for (int64_t e = 0; e < n; ++e) dst[e] += s[e];
    }
}

static void window_taps_transposed(float *restrict dst, const float *restrict src,
                                   int64_t n_src, int64_t n_dst, int64_t taps, int64_t step) {
    /* dst[e] = sum_{t < taps} src[e - t step] (0 outside src), e < n_dst */
    for (int64_t e = 0; e < n_dst; ++e) dst[e] = e < n_src ? src[e] : 0.0f;
    for (int64_t t = 1; t < taps; ++t) {
        int64_t off = t * step, hi = n_src + off < n_dst ? n_src + off : n_dst;
        float *d = dst + off;
        for (int64_t e = 0; e < hi - off; ++e) d[e] += src[e];
    }
}

/* The windows: sizes, the padded plane (Hp x Wp = np positions; nr row sums, nq column
 * sums), and what to sum. */
typedef struct {
    int64_t C, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, Wp, np, nr, nq;
    int square;
    float scale;
} windows;

/* One plane of sbnn_window_sum: in = x[m] (C planes), out = out[m]; P R Q: 3 np floats,
 * P's padding zero. */
static void plane_sum(const float *restrict in, float *restrict out, float *restrict P,
                      const windows *w) {
    float *R = P + w->np, *Q = R + w->np;
    const int64_t plane = w->H * w->W, Wp = w->Wp;
    for (int64_t y = 0; y < w->H; ++y) {
        float *prow = P + (y + w->ph) * Wp + w->pw;
        const float *xr = in + y * w->W;
        if (w->square)
            for (int64_t e = 0; e < w->W; ++e) prow[e] = xr[e] * xr[e];
        else
            for (int64_t e = 0; e < w->W; ++e) prow[e] = xr[e];
        for (int64_t c = 1; c < w->C; ++c) {
            const float *xc = xr + c * plane;
            if (w->square)
                for (int64_t e = 0; e < w->W; ++e) prow[e] += xc[e] * xc[e];
            else
                for (int64_t e = 0; e < w->W; ++e) prow[e] += xc[e];
        }
    }
    window_taps(R, P, w->nr, w->kw, 1);
    window_taps(Q, R, w->nq, w->kh, Wp);
    for (int64_t i = 0; i < w->Ho; ++i) {
        const float *q = Q + i * w->sh * Wp;
        float *o = out + i * w->Wo;
        if (w->sw == 1)
            for (int64_t j = 0; j < w->Wo; ++j) o[j] = w->scale * q[j];
        else
            for (int64_t j = 0; j < w->Wo; ++j) o[j] = w->scale * q[j * w->sw];
    }
}

/* One plane of the transposed sum: in = g[m] (Ho x Wo), out = gx[m] (H x W); Q R P: 3 np
 * floats, Q zero except at the window corners, which are overwritten here. */
static void plane_sum_transposed(const float *restrict in, float *restrict out,
                                 float *restrict Q, const windows *w) {
    float *R = Q + w->np, *P = R + w->np;
    const int64_t Wp = w->Wp;
    for (int64_t i = 0; i < w->Ho; ++i) { /* g at the windows' corners */
        float *q = Q + i * w->sh * Wp;
        const float *gi = in + i * w->Wo;
        if (w->sw == 1)
            for (int64_t j = 0; j < w->Wo; ++j) q[j] = gi[j];
        else
            for (int64_t j = 0; j < w->Wo; ++j) q[j * w->sw] = gi[j];
    }
    window_taps_transposed(R, Q, w->nq, w->nr, w->kh, Wp);
    window_taps_transposed(P, R, w->nr, w->np, w->kw, 1);
    for (int64_t y = 0; y < w->H; ++y) {
        const float *prow = P + (y + w->ph) * Wp + w->pw;
        for (int64_t e = 0; e < w->W; ++e) out[y * w->W + e] = w->scale * prow[e];
    }
}

/* Runs `transposed ? plane_sum_transposed : plane_sum` on the M planes, spread over the
 * threads; each thread allocates its own 3 np work floats. Returns 0, or 1 if a work
 * buffer could not be allocated (the output is then incomplete). */
static int each_plane(const float *restrict in, float *restrict out, int64_t M,
                      const windows *w, int transposed, int threads) {
    const int64_t in_size = transposed ? w->Ho * w->Wo : w->C * w->H * w->W;
    const int64_t out_size = transposed ? w->H * w->W : w->Ho * w->Wo;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed) \
    if (threads > 1 && M * (in_size > out_size ? in_size : out_size) >= PARALLEL_MIN * threads)
    {
        float *buf = malloc(sizeof(float) * (size_t)(3 * w->np));
        if (buf)
            for (int64_t e = 0; e < w->np; ++e) buf[e] = 0.0f;
        failed = buf == NULL;
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; ++m) {
            if (!buf) continue;
            if (transposed)
                plane_sum_transposed(in + m * in_size, out + m * out_size, buf, w);
            else
                plane_sum(in + m * in_size, out + m * out_size, buf, w);
        }
        free(buf);
    }
    return failed;
}

static windows make_windows(int64_t C, int64_t H, int64_t W, int64_t Ho, int64_t Wo,
                            int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                            int64_t pw, int square, float scale) {
    windows w = {C, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, 0, 0, 0, 0, square, scale};
    int64_t Hp = H + 2 * ph;
    w.Wp = W + 2 * pw;
    w.np = Hp * w.Wp;
    w.nr = w.np - (kw - 1);
    w.nq = (Hp - kh) * w.Wp + w.Wp - (kw - 1);
    return w;
}

/* Returns 0, or 1 if a work buffer could not be allocated (out is then incomplete). */
int sbnn_window_sum(const float *restrict x, float *restrict out, int64_t M, int64_t C,
                    int64_t H, int64_t W, int64_t Ho, int64_t Wo, int64_t kh, int64_t kw,
                    int64_t sh, int64_t sw, int64_t ph, int64_t pw, int square, float scale,
                    int threads) {
    windows w = make_windows(C, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, square, scale);
    return each_plane(x, out, M, &w, 0, threads);
}

/* The transposed window sum (the backward of sbnn_window_sum with C = 1, f(v) = v):
 * gx[m, y, x] = scale * sum over the windows (i, j) that contain (y, x) of g[m, i, j]. */
int sbnn_window_sum_backward(const float *restrict g, float *restrict gx, int64_t M,
                             int64_t H, int64_t W, int64_t Ho, int64_t Wo, int64_t kh,
                             int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                             float scale, int threads) {
    windows w = make_windows(1, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, 0, scale);
    return each_plane(g, gx, M, &w, 1, threads);
}

/* erfcx_pos for the tests. */
void sbnn_erfcx(const float *x, float *out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = erfcx_pos(x[i]);
}
