/* SwiGLU's activation, forward and backward, in one pass over memory each: WronAI's MLP kernel.
 *
 * Compiled on the user's machine at first use (wronai/kernels/native/__init__.py: the system C compiler,
 * -O3 -march=native, cached by source, compiler and CPU) and called through ctypes by
 * wronai/kernels/swiglu.py, which checks it against PyTorch's silu and mul before trusting it.
 *
 * Why: a Llama MLP computes h = silu(gate) * up. PyTorch runs that as two operations forward (silu, mul)
 * and three backward (two muls, silu_backward), each a pass over a positions x intermediate tensor, the
 * largest activations of the model; bf16 ones convert to float32 and back in every pass. Here
 *
 *     forward   h = g·σ(g)·u
 *     backward  du = dh·g·σ(g);   dg = dh·u·σ(g)·(1 + g·(1 − σ(g)))
 *
 * read each input once and write each output once, with every intermediate in float32 registers (a bf16
 * result is rounded once, to nearest even, as PyTorch rounds; bf16 goes through float32 blocks in L1). The
 * loops are plain C that the compiler vectorizes for the CPU it runs on (and the CPU's own bf16 conversion
 * where it has AVX512-BF16). Work is split into equal contiguous ranges, on PyTorch's own OpenMP
 * threads when built with -fopenmp next to a PyTorch that uses libgomp, else on threads started per call.
 *
 * Numbers: σ(g) = 1 / (1 + 2^(−g·log2 e)) with 2^t by Cephes' exp2f polynomial (relative error ~2e-7);
 * results are the same bits whatever thread computed them.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#endif

#define CHUNK 4096            /* elements: ranges are multiples of this */
#define MIN_PARALLEL 65536    /* fewer elements than this run on the calling thread */

typedef uint16_t bf16;

static inline float bits_to_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t float_to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float from_bf16(bf16 h) { return bits_to_float((uint32_t)h << 16); }

/* round to nearest even, NaN to PyTorch's quiet NaN (0x7fc0), as c10::BFloat16 rounds */
static inline bf16 to_bf16(float f) {
    const uint32_t u = float_to_bits(f);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (bf16)((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}

/* 1 / (1 + e^(-g)): 2^t with t = -g·log2 e clamped to [-126, 126], n = round(t), 2^(t - n) by a
 * polynomial, times 2^n through the exponent bits */
static inline float sigmoid(float g) {
    float t = -g * 1.44269504088896341f;
    t = t < -126.0f ? -126.0f : t;
    t = t > 126.0f ? 126.0f : t;
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding and subtracting it rounds to an integer */
    const float n = (t + magic) - magic;
    const float f = t - n;
    float p = 1.535336188319500e-4f;
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    const float e = bits_to_float(float_to_bits(p) + ((uint32_t)(int32_t)n << 23));
    return 1.0f / (1.0f + e);
}

typedef struct {
    const void *gate, *up, *grad;
    void *out, *dgate;
    int64_t n;
    int bf16, backward, threads;
} job;

static void forward_f32(const float *restrict g, const float *restrict u, float *restrict h, int64_t n) {
    for (int64_t i = 0; i < n; i++) h[i] = g[i] * sigmoid(g[i]) * u[i];
}

/* du is written over `out`'s place: the caller passes du there */
static void backward_f32(const float *restrict g, const float *restrict u, const float *restrict d,
                         float *restrict dg, float *restrict du, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const float x = g[i], s = sigmoid(x), silu = x * s;
        du[i] = d[i] * silu;
        dg[i] = d[i] * u[i] * (s + silu * (1.0f - s));
    }
}

#define BLOCK 512 /* bf16 work goes through float32 blocks of this many elements (in L1) */

static void widen(const bf16 *restrict src, float *restrict dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = from_bf16(src[i]);
}

/* float32 to bf16, rounded to nearest even: the CPU's own conversion where it has one (AVX512-BF16, which
 * rounds the same way; it flushes denormals, below 1.2e-38, to zero), else the integer rounding above */
static void narrow(const float *restrict src, bf16 *restrict dst, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) {
        const __m256bh packed = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
        _mm256_storeu_si256((__m256i *)(dst + i), (__m256i)packed);
    }
#endif
    for (; i < n; i++) dst[i] = to_bf16(src[i]);
}

static void forward_bf16(const bf16 *g, const bf16 *u, bf16 *h, int64_t n) {
    float G[BLOCK], U[BLOCK], H[BLOCK];
    for (int64_t b = 0; b < n; b += BLOCK) {
        const int64_t m = n - b < BLOCK ? n - b : BLOCK;
        widen(g + b, G, m);
        widen(u + b, U, m);
        forward_f32(G, U, H, m);
        narrow(H, h + b, m);
    }
}

static void backward_bf16(const bf16 *g, const bf16 *u, const bf16 *d, bf16 *dg, bf16 *du, int64_t n) {
    float G[BLOCK], U[BLOCK], D[BLOCK], DG[BLOCK], DU[BLOCK];
    for (int64_t b = 0; b < n; b += BLOCK) {
        const int64_t m = n - b < BLOCK ? n - b : BLOCK;
        widen(g + b, G, m);
        widen(u + b, U, m);
        widen(d + b, D, m);
        backward_f32(G, U, D, DG, DU, m);
        narrow(DG, dg + b, m);
        narrow(DU, du + b, m);
    }
}

/* the part [begin, end) of the job */
static void run_range(const job *J, int64_t begin, int64_t end) {
    const int64_t n = end - begin;
    if (n <= 0) return;
    if (J->bf16) {
        const bf16 *g = (const bf16 *)J->gate + begin, *u = (const bf16 *)J->up + begin;
        if (J->backward)
            backward_bf16(g, u, (const bf16 *)J->grad + begin, (bf16 *)J->dgate + begin, (bf16 *)J->out + begin, n);
        else
            forward_bf16(g, u, (bf16 *)J->out + begin, n);
    } else {
        const float *g = (const float *)J->gate + begin, *u = (const float *)J->up + begin;
        if (J->backward)
            backward_f32(g, u, (const float *)J->grad + begin, (float *)J->dgate + begin, (float *)J->out + begin, n);
        else
            forward_f32(g, u, (float *)J->out + begin, n);
    }
}

typedef struct {
    const job *J;
    int index;
} part;

/* thread `index` of J->threads takes an equal share of whole chunks */
static void *run_part(void *arg) {
    const part *P = arg;
    const job *J = P->J;
    const int64_t chunks = (J->n + CHUNK - 1) / CHUNK;
    const int64_t first = chunks * P->index / J->threads, last = chunks * (P->index + 1) / J->threads;
    const int64_t end = last * CHUNK < J->n ? last * CHUNK : J->n;
    run_range(J, first * CHUNK, end);
    return NULL;
}

static int run(job *J) {
    if (J->n < MIN_PARALLEL || J->threads < 1) J->threads = 1;
#ifdef _OPENMP
    /* built against the OpenMP runtime PyTorch runs (the same libgomp.so.1): its threads take the parts */
#pragma omp parallel num_threads(J->threads)
    {
        job mine = *J;
        mine.threads = omp_get_num_threads();
        part P = {&mine, omp_get_thread_num()};
        run_part(&P);
    }
#else
    pthread_t *ids = J->threads > 1 ? malloc((size_t)(J->threads - 1) * sizeof(pthread_t)) : NULL;
    part *parts = malloc((size_t)J->threads * sizeof(part));
    if (!parts) {
        free(ids);
        return 1;
    }
    int started = 0;
    for (int i = 0; i < J->threads; i++) parts[i] = (part){J, i};
    for (int i = 1; ids && i < J->threads; i++) {
        if (pthread_create(&ids[started], NULL, run_part, &parts[i]) != 0) {
            run_part(&parts[i]); /* no thread: this one does that part too */
            continue;
        }
        started++;
    }
    run_part(&parts[0]);
    for (int i = 0; i < started; i++) pthread_join(ids[i], NULL);
    free(ids);
    free(parts);
#endif
    return 0;
}

/* h = silu(g) * u for n elements, float32 (bf16 = 0) or bfloat16 (bf16 = 1); contiguous. 0 on success. */
int wronai_swiglu_forward(const void *gate, const void *up, void *out, int64_t n, int bf16, int threads) {
    job J = {gate, up, NULL, out, NULL, n, bf16, 0, threads};
    return run(&J);
}

/* dg and du of h = silu(g) * u for the gradient d of h; same dtypes and layout as the forward. */
int wronai_swiglu_backward(const void *gate, const void *up, const void *grad, void *dgate, void *dup,
                           int64_t n, int bf16, int threads) {
    job J = {gate, up, grad, dup, dgate, n, bf16, 1, threads};
    return run(&J);
}
