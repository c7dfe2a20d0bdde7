/* Causal attention for many short examples at once, on a CPU: WronAI's per-example attention kernel.
 *
 * Compiled on the user's machine at first use (wronai/kernels/native/__init__.py: the system C compiler,
 * -O3 -march=native, cached by source, compiler and CPU) and called through ctypes by
 * wronai/kernels/cpu_attention.py, which checks it against PyTorch's sdpa before trusting it.
 *
 * Why: PyTorch's CPU flash attention cuts every example into 32-query blocks and calls a BLAS gemm per
 * block; on examples of ~100 tokens it runs at 25-40 GFLOP/s, a fifth of the matmul peak, and its backward
 * is 2.5x its forward. Here one call takes every example of a layer (no per-example Python), each
 * (example, kv head) pair is one task, and the products are register-blocked
 * loops the compiler vectorizes for the CPU it runs on. The tasks run on PyTorch's own OpenMP threads
 * when built with -fopenmp next to a PyTorch that uses libgomp, else on threads started per call.
 *
 * P. With `probs` (E x H blocks of n rows x W floats, W = Lk rounded up to 16, at poffs[e * H + h]) the
 * forward keeps the probabilities there and the backward reads them; with NULL the backward recomputes
 * them from the log-sum-exp (one more product per block, no positions^2 memory).
 *
 * Layout. q is (B, H, T, D), k and v are (B, KH, T, D), any strides with d contiguous; H = KH * G (grouped
 * queries). The examples are given as int64 5-tuples (row, start, n, prefix, shared): the example's own
 * tokens are row positions [start, start + n); it attends causally to them, after the row's positions
 * [0, prefix), which it sees whole (a shared prompt start computed once by the row's first example;
 * prefix = 0 for a plain example). Every row position belongs to exactly one example's own tokens;
 * shared = how many of the example's first own tokens other examples see as their prefix (the row's first
 * example: their gradients are summed from several tasks, in task order after all ran), else 0.
 * The forward writes out (any strides, d contiguous) and the log-sum-exp of every query (B, H, T);
 * the backward adds dq (written), dk and dv (accumulated: pass zeros).
 *
 * Numbers: float32 throughout, exp by a polynomial with ~2e-7 relative error; outputs equal sdpa's to
 * float rounding (the Python side checks before first use), and the same inputs give the same bits
 * whatever thread ran which task. The caller checks that the examples cover the rows exactly.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MR 6
#define NR 16
#define QBLOCK 64
#define FIELDS 5 /* int64 values per example: row, start, n, prefix, shared */

typedef struct {
    const float *p;
    int64_t sb, sh, st; /* strides in elements of the row, head and position dims */
} view;

static inline const float *at(const view *v, int64_t b, int64_t h, int64_t t) {
    return v->p + b * v->sb + h * v->sh + t * v->st;
}

typedef float v8 __attribute__((vector_size(32), aligned(4))); /* 8 floats, unaligned loads allowed */

static inline v8 load8(const float *p) { return *(const v8 *)p; }
static inline void store8(float *p, v8 x) { *(v8 *)p = x; }
static inline v8 splat8(float a) { return (v8){a, a, a, a, a, a, a, a}; }

static inline int64_t round16(int64_t x) { return (x + 15) & ~(int64_t)15; }

enum { CAUSAL_N = 1, CAUSAL_K, CAUSAL_KT };

/* C (M x N, ldc) = or += A (M x K) * B (K x N, ldb, row-major); A(i, k) = A[i * sa + k * sk], so A may be
 * a transposed view; N a multiple of 16. A block of MR rows x 16 columns of C stays in registers while k
 * runs (12 vector accumulators: fits AVX2's 16 registers).
 * Causal products skip what the mask zeroes, per block of rows ending at row e (exclusive):
 * CAUSAL_N computes columns < round16(off + e) (S = Q K^T: query i sees keys <= off + i),
 * CAUSAL_K sums k < off + e (P V: P is zero past a query's keys), CAUSAL_KT sums k >= i - off for the
 * block's first row i (P^T dO: key i is seen by queries >= i - off). Columns skipped are left as they are. */
/* ROWS rows of C (n_end columns): accumulators in registers; ROWS is a constant where it is inlined */
static inline __attribute__((always_inline)) void gemm_rows(const int ROWS, int64_t n_end, int64_t k_begin,
                                                             int64_t k_end, const float *restrict a, int64_t sa,
                                                             int64_t sk, const float *restrict B, int64_t ldb,
                                                             float *restrict C, int64_t ldc, int accumulate) {
    for (int64_t j0 = 0; j0 < n_end; j0 += NR) {
        v8 c[MR][2];
        for (int ii = 0; ii < ROWS; ii++) {
            c[ii][0] = accumulate ? load8(C + ii * ldc + j0) : splat8(0.0f);
            c[ii][1] = accumulate ? load8(C + ii * ldc + j0 + 8) : splat8(0.0f);
        }
        for (int64_t k = k_begin; k < k_end; k++) {
            const v8 b0 = load8(B + k * ldb + j0), b1 = load8(B + k * ldb + j0 + 8);
            for (int ii = 0; ii < ROWS; ii++) {
                const v8 x = splat8(a[ii * sa + k * sk]);
                c[ii][0] += x * b0;
                c[ii][1] += x * b1;
            }
        }
        for (int ii = 0; ii < ROWS; ii++) {
            store8(C + ii * ldc + j0, c[ii][0]);
            store8(C + ii * ldc + j0 + 8, c[ii][1]);
        }
    }
}

static void gemm(int64_t M, int64_t N, int64_t K, const float *restrict A, int64_t sa, int64_t sk,
                 const float *restrict B, int64_t ldb, float *restrict C, int64_t ldc, int accumulate,
                 int causal, int64_t off) {
    for (int64_t i0 = 0; i0 < M;) {
        const int rows = M - i0 >= MR ? MR : (int)(M - i0);
        const int64_t e = i0 + rows;
        int64_t n_end = N, k_begin = 0, k_end = K;
        if (causal == CAUSAL_N && round16(off + e) < N) n_end = round16(off + e);
        if (causal == CAUSAL_K && off + e < K) k_end = off + e;
        if (causal == CAUSAL_KT && i0 - off > 0) k_begin = i0 - off < K ? i0 - off : K;
        const float *a = A + i0 * sa;
        float *c = C + i0 * ldc;
        switch (rows) { /* the last rows of C: a block of their own size, still in registers */
        case MR: gemm_rows(MR, n_end, k_begin, k_end, a, sa, sk, B, ldb, c, ldc, accumulate); break;
        case 5: gemm_rows(5, n_end, k_begin, k_end, a, sa, sk, B, ldb, c, ldc, accumulate); break;
        case 4: gemm_rows(4, n_end, k_begin, k_end, a, sa, sk, B, ldb, c, ldc, accumulate); break;
        case 3: gemm_rows(3, n_end, k_begin, k_end, a, sa, sk, B, ldb, c, ldc, accumulate); break;
        case 2: gemm_rows(2, n_end, k_begin, k_end, a, sa, sk, B, ldb, c, ldc, accumulate); break;
        default: gemm_rows(1, n_end, k_begin, k_end, a, sa, sk, B, ldb, c, ldc, accumulate); break;
        }
        i0 = e;
    }
}

typedef int32_t v8i __attribute__((vector_size(32), aligned(4)));

#if defined(__clang__)
#define SHUFFLE8(a, b, i0, i1, i2, i3, i4, i5, i6, i7) __builtin_shufflevector(a, b, i0, i1, i2, i3, i4, i5, i6, i7)
#else
#define SHUFFLE8(a, b, i0, i1, i2, i3, i4, i5, i6, i7) __builtin_shuffle(a, b, (v8i){i0, i1, i2, i3, i4, i5, i6, i7})
#endif

/* 2^t of 8 floats: n the nearest integer to t, 2^(t - n) by Cephes' exp2f polynomial (relative error
 * ~2e-7 on |t - n| <= 1/2), times 2^n by adding n to the exponent bits. t is clamped below at -126 (float's
 * smallest normal power); not above: callers keep only values of t <= 0 (a softmax's, after its max). */
static inline v8 exp2_8(v8 t) {
    const v8i low = t < splat8(-126.0f);
    t = (v8)(((v8i)t & ~low) | ((v8i)splat8(-126.0f) & low));
    const v8 magic = splat8(12582912.0f); /* 1.5 * 2^23: adding and subtracting it rounds to an integer */
    const v8 n = (t + magic) - magic;
    const v8 f = t - n;
    v8 p = splat8(1.535336188319500e-4f);
    p = p * f + splat8(1.339887440266574e-3f);
    p = p * f + splat8(9.618437357674640e-3f);
    p = p * f + splat8(5.550332471162809e-2f);
    p = p * f + splat8(2.402264791363012e-1f);
    p = p * f + splat8(6.931472028550421e-1f);
    p = p * f + splat8(1.0f);
    return (v8)((v8i)p + (__builtin_convertvector(n, v8i) << 23));
}

/* s[j] = exp(s[j] * scale - shift) for j < count, rounded up to 8 (s has room for it): 2^(s·scale·log2 e −
 * shift·log2 e), one multiply-add per element before the power */
static void exp_row(float *restrict s, int64_t count, float scale, float shift) {
    const float log2e = 1.44269504088896341f;
    const v8 sc = splat8(scale * log2e), sh = splat8(shift * log2e);
    for (int64_t j = 0; j < count; j += 8) store8(s + j, exp2_8(load8(s + j) * sc - sh));
}

static float max_row(const float *restrict s, int64_t count) {
    v8 m = splat8(-INFINITY);
    int64_t j = 0;
    for (; j + 8 <= count; j += 8) {
        const v8 x = load8(s + j);
        const v8i gt = x > m;
        m = (v8)(((v8i)x & gt) | ((v8i)m & ~gt));
    }
    float mx = -INFINITY;
    for (int i = 0; i < 8; i++) mx = m[i] > mx ? m[i] : mx;
    for (; j < count; j++) mx = s[j] > mx ? s[j] : mx;
    return mx;
}

static float sum_row(const float *restrict s, int64_t count) {
    v8 acc = splat8(0.0f);
    int64_t j = 0;
    for (; j + 8 <= count; j += 8) acc += load8(s + j);
    float sum = 0.0f;
    for (int i = 0; i < 8; i++) sum += acc[i];
    for (; j < count; j++) sum += s[j];
    return sum;
}

/* T[j * ldt + i] = A[i * lda + j] for i < rows, j < cols: 8 x 8 blocks transposed in registers. */
static void transpose(int64_t rows, int64_t cols, const float *restrict A, int64_t lda, float *restrict T,
                      int64_t ldt) {
    int64_t i0 = 0;
    for (; i0 + 8 <= rows; i0 += 8) {
        int64_t j0 = 0;
        for (; j0 + 8 <= cols; j0 += 8) {
            v8 r[8], s[8], u[8];
            for (int i = 0; i < 8; i++) r[i] = load8(A + (i0 + i) * lda + j0);
            for (int i = 0; i < 8; i += 2) {
                s[i] = SHUFFLE8(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
                s[i + 1] = SHUFFLE8(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
            }
            for (int i = 0; i < 8; i += 4)
                for (int h = 0; h < 2; h++) {
                    u[i + h] = SHUFFLE8(s[i + h], s[i + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
                    u[i + h + 2] = SHUFFLE8(s[i + h], s[i + h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
                }
            for (int h = 0; h < 4; h++) { /* u holds columns (0, 4), (2, 6), (1, 5), (3, 7) */
                const int64_t c = j0 + (h == 1 ? 2 : h == 2 ? 1 : h);
                store8(T + c * ldt + i0, SHUFFLE8(u[h], u[h + 4], 0, 1, 2, 3, 8, 9, 10, 11));
                store8(T + (c + 4) * ldt + i0, SHUFFLE8(u[h], u[h + 4], 4, 5, 6, 7, 12, 13, 14, 15));
            }
        }
        for (; j0 < cols; j0++)
            for (int i = 0; i < 8; i++) T[j0 * ldt + i0 + i] = A[(i0 + i) * lda + j0];
    }
    for (; i0 < rows; i0++)
        for (int64_t j = 0; j < cols; j++) T[j * ldt + i0] = A[i0 * lda + j];
}

typedef struct {
    view q, k, v, o, lse, dout;
    float *dq, *dk, *dv;
    int64_t dqs[3], dks[3], dvs[3];
    int64_t H, KH, D;
    float scale;
    const int64_t *ex; /* (row, start, n, prefix, shared) per example */
    float *probs;          /* kept P, or NULL: the backward recomputes it from the log-sum-exp */
    const int64_t *poffs;  /* where example e, head h starts in probs: poffs[e * H + h] (rows of W floats) */
    int64_t *order;    /* tasks, costliest first: task = example * KH + kv head */
    int64_t ntasks;
    int backward;
    int64_t next; /* the next task to take (atomic) */
    float *shared;       /* backward: each task's dK, dV rows that other tasks add to as well ... */
    int64_t *shared_off; /* ... at shared + shared_off[task], summed in task order after all ran */
    int failed;
} job;

/* row position of an example's j-th visible key: the shared prefix first, then its own tokens */
static inline int64_t key_pos(const int64_t *e, int64_t j) { return j < e[3] ? j : e[1] + (j - e[3]); }

/* the first rows of an example's dK, dV that other tasks add to as well: the prefix it sees, or its own
 * first tokens that others see as theirs */
static inline int64_t shared_rows_of(const int64_t *e) { return e[3] ? e[3] : e[4]; }

/* Past a query's keys, P and dS are zero; the causal products read row i's zeros up to here (CAUSAL_K:
 * its block of MR rows ends at most MR - 1 rows below it; CAUSAL_KT: a block of key rows starts at most at
 * off + i), so they are written up to here. */
static inline int64_t read_end(int64_t off, int64_t i, int64_t W) {
    const int64_t end = off + i + MR;
    return end < W ? end : W;
}

/* dk, dv of row position t (kv head g) += a, b */
static void add_rows(const job *J, int64_t row, int64_t g, int64_t t, const float *a, const float *b) {
    float *dk = J->dk + row * J->dks[0] + g * J->dks[1] + t * J->dks[2];
    float *dv = J->dv + row * J->dvs[0] + g * J->dvs[1] + t * J->dvs[2];
    for (int64_t d = 0; d < J->D; d++) {
        dk[d] += a[d];
        dv[d] += b[d];
    }
}

/* The block's r rows of scores S (query i sees keys < off + i + 1) made probabilities P in place: the
 * forward subtracts the row's max and keeps the log-sum-exp, the backward uses the kept one; zeros past a
 * query's keys as far as the causal products read. */
static void softmax_rows(const job *J, float *S, int64_t W, int64_t r, int64_t off, int64_t row, int64_t h,
                         int64_t t0) {
    for (int64_t i = 0; i < r; i++) {
        float *s = S + i * W;
        const int64_t seen = off + i + 1;
        float *lse = (float *)at(&J->lse, row, h, t0 + i);
        if (J->backward) {
            exp_row(s, seen, J->scale, *lse);
        } else {
            const float shift = max_row(s, seen) * J->scale;
            exp_row(s, seen, J->scale, shift);
            const float sum = sum_row(s, seen), inv = 1.0f / sum;
            for (int64_t j = 0; j < seen; j++) s[j] *= inv;
            *lse = shift + logf(sum);
        }
        for (int64_t j = seen; j < read_end(off, i, W); j++) s[j] = 0.0f;
    }
}

/* One example and one kv head: the queries of every head of the group, in blocks of QBLOCK. Q, dO, O,
 * dQ (and K, V, dK without a shared prefix) are read and written in place, at their strides. */
static int run_task(job *J, int64_t task) {
    const int64_t *e = J->ex + FIELDS * (task / J->KH);
    const int64_t g = task % J->KH, row = e[0], start = e[1], n = e[2], prefix = e[3];
    const int64_t shared_rows = shared_rows_of(e); /* its first rows of dK, dV: other tasks add to them too */
    const int64_t D = J->D, Lk = prefix + n, W = round16(Lk), G = J->H / J->KH;
    const int64_t rb = QBLOCK < n ? QBLOCK : n, qs = J->q.st, os = J->o.st;
    if (n <= 0) return 0;
    /* K^T, V^T (D x W, zero past Lk); S/P and dP/dS (rb x W); with a prefix K, V (Lk x D); dK, dV */
    size_t floats = (size_t)(2 * D * W + 2 * rb * W + (prefix ? 2 * Lk * D : 0) + rb);
    if (J->backward && shared_rows) floats += (size_t)(2 * Lk * D);
    float *buf = malloc(floats * sizeof(float));
    if (!buf) return 1;
    float *KT = buf, *VT = KT + D * W, *Sbuf = VT + D * W, *dP = Sbuf + rb * W, *Di = dP + rb * W, *next = Di + rb;
    const float *K = at(&J->k, row, g, start), *V = at(&J->v, row, g, start);
    int64_t ldk = J->k.st, ldv = J->v.st;
    if (prefix) { /* the row's first tokens, then the example's own: copied into one run of rows */
        float *Kc = next, *Vc = Kc + Lk * D;
        next = Vc + Lk * D;
        for (int64_t j = 0; j < Lk; j++) {
            memcpy(Kc + j * D, at(&J->k, row, g, key_pos(e, j)), D * sizeof(float));
            memcpy(Vc + j * D, at(&J->v, row, g, key_pos(e, j)), D * sizeof(float));
        }
        K = Kc, V = Vc, ldk = ldv = D;
    }
    if (!(J->backward && J->probs)) transpose(Lk, D, K, ldk, KT, W); /* only S = Q K^T reads K^T */
    transpose(Lk, D, V, ldv, VT, W);
    for (int64_t d = 0; d < D; d++) {
        memset(KT + d * W + Lk, 0, (W - Lk) * sizeof(float));
        memset(VT + d * W + Lk, 0, (W - Lk) * sizeof(float));
    }
    float *dK = NULL, *dV = NULL;
    int64_t lddk = D, lddv = D;
    if (J->backward && shared_rows) {
        dK = next, dV = dK + Lk * D;
        memset(dK, 0, (size_t)(2 * Lk * D) * sizeof(float));
    } else if (J->backward) { /* the example's own rows of dk, dv: no other task writes them */
        dK = J->dk + row * J->dks[0] + g * J->dks[1] + start * J->dks[2], lddk = J->dks[2];
        dV = J->dv + row * J->dvs[0] + g * J->dvs[1] + start * J->dvs[2], lddv = J->dvs[2];
    }
    for (int64_t hh = 0; hh < G; hh++) {
        const int64_t h = g * G + hh;
        for (int64_t i0 = 0; i0 < n; i0 += rb) {
            const int64_t r = rb < n - i0 ? rb : n - i0;
            const int64_t keys = prefix + i0 + r, off = prefix + i0; /* query i of the block sees keys <= off + i */
            const float *Q = at(&J->q, row, h, start + i0);
            /* P kept by the forward: computed there in place and read back here */
            float *S = J->probs ? J->probs + J->poffs[(task / J->KH) * J->H + h] + i0 * W : Sbuf;
            if (!(J->backward && J->probs)) {
                gemm(r, round16(keys), D, Q, qs, 1, KT, W, S, W, 0, CAUSAL_N, off); /* S = Q K^T */
                softmax_rows(J, S, W, r, off, row, h, start + i0);
            }
            if (!J->backward) { /* O = P V, into the output rows */
                gemm(r, D, keys, S, W, 1, V, ldv, (float *)at(&J->o, row, h, start + i0), os, 0, CAUSAL_K, off);
                continue;
            }
            const float *dO = at(&J->dout, row, h, start + i0);
            const int64_t dos = J->dout.st;
            for (int64_t i = 0; i < r; i++) {
                const float *go = dO + i * dos, *oo = at(&J->o, row, h, start + i0 + i);
                float dot = 0.0f;
                for (int64_t d = 0; d < D; d++) dot += go[d] * oo[d];
                Di[i] = dot;
            }
            gemm(r, round16(keys), D, dO, dos, 1, VT, W, dP, W, 0, CAUSAL_N, off); /* dP = dO V^T */
            for (int64_t i = 0; i < r; i++) {
                const float *restrict p = S + i * W;
                float *restrict ds = dP + i * W;
                const float di = Di[i], sc = J->scale;
                const int64_t seen = off + i + 1;
                for (int64_t j = 0; j < seen; j++) ds[j] = p[j] * (ds[j] - di) * sc;
                for (int64_t j = seen; j < read_end(off, i, W); j++) ds[j] = 0.0f;
            }
            float *dQ = J->dq + row * J->dqs[0] + h * J->dqs[1] + (start + i0) * J->dqs[2];
            gemm(r, D, keys, dP, W, 1, K, ldk, dQ, J->dqs[2], 0, CAUSAL_K, off); /* dQ = dS K */
            gemm(keys, D, r, S, 1, W, dO, dos, dV, lddv, 1, CAUSAL_KT, off); /* dV += P^T dO */
            gemm(keys, D, r, dP, 1, W, Q, qs, dK, lddk, 1, CAUSAL_KT, off); /* dK += dS^T Q */
        }
    }
    if (J->backward && shared_rows) {
        for (int64_t j = shared_rows; j < Lk; j++) add_rows(J, row, g, key_pos(e, j), dK + j * D, dV + j * D);
        /* a shared prompt start, which every example of the row adds to: kept for the sum in task order
         * (in the order threads finish, float sums would differ from run to run) */
        float *kept = J->shared + J->shared_off[task];
        memcpy(kept, dK, (size_t)(shared_rows * D) * sizeof(float));
        memcpy(kept + shared_rows * D, dV, (size_t)(shared_rows * D) * sizeof(float));
    }
    free(buf);
    return 0;
}

static void *worker(void *arg) {
    job *J = arg;
    for (;;) {
        const int64_t i = __atomic_fetch_add(&J->next, 1, __ATOMIC_RELAXED);
        if (i >= J->ntasks) break;
        if (run_task(J, J->order[i])) __atomic_store_n(&J->failed, 1, __ATOMIC_RELAXED);
    }
    return NULL;
}

static int cmp_cost(const void *a, const void *b) {
    const int64_t *x = a, *y = b;
    return x[0] < y[0] ? 1 : x[0] > y[0] ? -1 : 0;
}

static int run(job *J, int64_t E, int threads) {
    J->ntasks = E * J->KH;
    int64_t *pairs = malloc((size_t)(2 * J->ntasks) * sizeof(int64_t));
    J->order = malloc((size_t)J->ntasks * sizeof(int64_t));
    J->shared_off = malloc((size_t)(J->ntasks + 1) * sizeof(int64_t));
    if (!pairs || !J->order || !J->shared_off) {
        free(pairs);
        free(J->order);
        free(J->shared_off);
        return 1;
    }
    J->shared_off[0] = 0;
    for (int64_t t = 0; t < J->ntasks; t++)
        J->shared_off[t + 1] = J->shared_off[t] + (J->backward ? 2 * shared_rows_of(J->ex + FIELDS * (t / J->KH)) * J->D : 0);
    J->shared = J->shared_off[J->ntasks] ? malloc((size_t)J->shared_off[J->ntasks] * sizeof(float)) : NULL;
    if (J->shared_off[J->ntasks] && !J->shared) {
        free(pairs);
        free(J->order);
        free(J->shared_off);
        return 1;
    }
    for (int64_t t = 0; t < J->ntasks; t++) {
        const int64_t *e = J->ex + FIELDS * (t / J->KH);
        pairs[2 * t] = e[2] * (e[3] + e[2] / 2 + 1);
        pairs[2 * t + 1] = t;
    }
    qsort(pairs, (size_t)J->ntasks, 2 * sizeof(int64_t), cmp_cost);
    for (int64_t t = 0; t < J->ntasks; t++) J->order[t] = pairs[2 * t + 1];
    free(pairs);
    J->next = 0;
    J->failed = 0;
    if (threads > J->ntasks) threads = (int)J->ntasks;
#ifdef _OPENMP
    /* built against the OpenMP runtime PyTorch runs (the same libgomp.so.1): its threads take the tasks,
     * instead of new threads competing with PyTorch's, which spin for milliseconds after each operation */
#pragma omp parallel num_threads(threads)
    worker(J);
#else
    pthread_t *ids = threads > 1 ? malloc((size_t)(threads - 1) * sizeof(pthread_t)) : NULL;
    int started = 0;
    for (int i = 0; ids && i < threads - 1; i++)
        if (pthread_create(&ids[i], NULL, worker, J) == 0) started++;
    worker(J);
    for (int i = 0; i < started; i++) pthread_join(ids[i], NULL);
    free(ids);
#endif
    for (int64_t t = 0; t < J->ntasks && !J->failed; t++) { /* the shared rows, summed in task order */
        const int64_t *e = J->ex + FIELDS * (t / J->KH), shared_rows = J->shared_off[t + 1] - J->shared_off[t];
        const float *kept = J->shared + J->shared_off[t];
        for (int64_t j = 0; j < shared_rows / (2 * J->D); j++)
            add_rows(J, e[0], t % J->KH, key_pos(e, j), kept + j * J->D, kept + (shared_rows / 2) + j * J->D);
    }
    free(J->shared);
    free(J->shared_off);
    free(J->order);
    return J->failed;
}

static view make_view(const float *p, const int64_t *s) {
    view v = {p, s[0], s[1], s[2]};
    return v;
}

/* the fields forward and backward share */
static job make_job(const float *q, const int64_t *qs, const float *k, const int64_t *ks, const float *v,
                    const int64_t *vs, const float *out, const int64_t *os, const float *lse, const int64_t *ls,
                    int64_t H, int64_t KH, int64_t D, float scale, const int64_t *ex, float *probs,
                    const int64_t *poffs) {
    job J;
    memset(&J, 0, sizeof J);
    J.q = make_view(q, qs);
    J.k = make_view(k, ks);
    J.v = make_view(v, vs);
    J.o = make_view(out, os);
    J.lse = make_view(lse, ls);
    J.H = H;
    J.KH = KH;
    J.D = D;
    J.scale = scale;
    J.ex = ex;
    J.probs = probs;
    J.poffs = poffs;
    return J;
}

int wronai_attention_forward(const float *q, const int64_t *qs, const float *k, const int64_t *ks,
                             const float *v, const int64_t *vs, float *out, const int64_t *os, float *lse,
                             const int64_t *ls, int64_t H, int64_t KH, int64_t D, float scale,
                             const int64_t *ex, int64_t E, float *probs, const int64_t *poffs, int threads) {
    job J = make_job(q, qs, k, ks, v, vs, out, os, lse, ls, H, KH, D, scale, ex, probs, poffs);
    return run(&J, E, threads);
}

int wronai_attention_backward(const float *q, const int64_t *qs, const float *k, const int64_t *ks,
                              const float *v, const int64_t *vs, const float *out, const int64_t *os,
                              const float *lse, const int64_t *ls, const float *dout, const int64_t *dos,
                              float *dq, const int64_t *dqs, float *dk, const int64_t *dks, float *dv,
                              const int64_t *dvs, int64_t H, int64_t KH, int64_t D, float scale,
                              const int64_t *ex, int64_t E, float *probs, const int64_t *poffs, int threads) {
    job J = make_job(q, qs, k, ks, v, vs, out, os, lse, ls, H, KH, D, scale, ex, probs, poffs);
    J.dout = make_view(dout, dos);
    J.dq = dq;
    J.dk = dk;
    J.dv = dv;
    memcpy(J.dqs, dqs, sizeof J.dqs);
    memcpy(J.dks, dks, sizeof J.dks);
    memcpy(J.dvs, dvs, sizeof J.dvs);
    J.backward = 1;
    return run(&J, E, threads);
}
