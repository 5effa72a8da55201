/* saecli's compiled CPU kernels for the sparse train steps (see native.py for what each does and why).
   Built on first use by native.py with gcc -O3 -Wall (-march=native -fopenmp where available) into a
   per-user cache; every entry point takes raw pointers and leading dimensions (ctypes). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else /* built without OpenMP (the last flag set): the pragmas are ignored and one thread runs */
static int omp_get_thread_num(void) { return 0; }
#endif
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

typedef int32_t i32;
typedef int64_t i64;

/* a > b, with NaN above every number (torch.topk's order) */
static inline int gtf(float a, float b) { return a > b || (a != a && b == b); }

/* min-heap (under gtf) of keys hv with ids hi */
static inline void sift_down(float *hv, i32 *hi, i64 k, i64 pos) {
    float v = hv[pos];
    i32 id = hi[pos];
    for (;;) {
        i64 c = 2 * pos + 1;
        if (c >= k) break;
        if (c + 1 < k && gtf(hv[c], hv[c + 1])) c++;
        if (!gtf(v, hv[c])) break;
        hv[pos] = hv[c];
        hi[pos] = hi[c];
        pos = c;
    }
    hv[pos] = v;
    hi[pos] = id;
}

static inline float key_of(const float *row, const float *bias, const float *gate, i64 j) {
    float v = row[j];
    if (bias) v += bias[j];
    if (gate) v *= gate[j];
    return v;
}

static inline void offer(float *hv, i32 *hi, i64 k, float v, i64 j) {
    if (gtf(v, hv[0])) {
        hv[0] = v;
        hi[0] = (i32)j;
        sift_down(hv, hi, k, 0);
    }
}

/* the k-heap scan over every element: any row (NaN, inf, few columns) */
static void topk_row_heap(const float *row, i64 s, const float *bias, const float *gate, i64 k,
                          float *hv, i32 *hi) {
    for (i64 j = 0; j < k; j++) { hv[j] = key_of(row, bias, gate, j); hi[j] = (i32)j; }
    for (i64 p = k / 2 - 1; p >= 0; p--) sift_down(hv, hi, k, p);
    for (i64 j = k; j < s; j++) {
        float v = key_of(row, bias, gate, j);
        if (!(v <= hv[0])) offer(hv, hi, k, v, j);
    }
}

#define LANES 16
#define GROUP 8 /* a group = one lane of GROUP consecutive LANES-wide vectors */

static inline i64 count_ge(const float *g, i64 n, float t) {
    i64 c = 0;
    #pragma omp simd reduction(+:c)
    for (i64 i = 0; i < n; i++) c += g[i] >= t;
    return c;
}

/* Exact top-k of one row's keys (h + bias)*gate; hv/hi receive the pre-activations h + bias and columns.
   Pass 1 writes the keys to `keys` and the max of each group of GROUP elements to `gm`. Any t with at
   least k group maxima >= t is <= the k-th largest key (the groups are disjoint), so pass 2 offers the
   k-heap only the keys >= t: about k of them, against ~k·ln(s/k) heap insertions in a plain scan. */
static void topk_row(const float *row, i64 s, const float *bias, const float *gate, i64 k,
                     float *hv, i32 *hi, float *keys, float *gm, const float *next) {
    (void)next; /* only the AVX loops prefetch */
    const i64 nb = s / (LANES * GROUP), body = nb * LANES * GROUP;
    const i64 G = nb * LANES + (s - body); /* groups: lanes of the full blocks, then tail singletons */
    if (nb * LANES < 2 * k) {
        topk_row_heap(row, s, bias, gate, k, hv, hi);
        goto finish;
    }
    const float *kp = row;
    int bad = 0;
    if (bias || gate) {
        #pragma omp simd reduction(|:bad)
        for (i64 j = 0; j < s; j++) { float v = key_of(row, bias, gate, j); keys[j] = v; bad |= v - v != 0.f; }
        kp = keys;
    } else {
        #pragma omp simd reduction(|:bad)
        for (i64 j = 0; j < s; j++) bad |= row[j] - row[j] != 0.f;
    }
    if (bad) { /* NaN or inf: the plain scan orders them */
        topk_row_heap(row, s, bias, gate, k, hv, hi);
        goto finish;
    }
    for (i64 b = 0; b < nb; b++) {
        const float *base = kp + b * LANES * GROUP;
        float *g = gm + b * LANES;
        #pragma omp simd
        for (int l = 0; l < LANES; l++) {
            float m = base[l];
            for (int i = 1; i < GROUP; i++) { float v = base[i * LANES + l]; m = v > m ? v : m; }
            g[l] = m;
        }
    }
    for (i64 j = body; j < s; j++) gm[nb * LANES + (j - body)] = kp[j];
    float lo = gm[0], hi_ = gm[0];
    #pragma omp simd reduction(min:lo) reduction(max:hi_)
    for (i64 g = 0; g < G; g++) { lo = gm[g] < lo ? gm[g] : lo; hi_ = gm[g] > hi_ ? gm[g] : hi_; }
    float t = hi_; /* bisection keeps count(gm >= lo) >= k (true at the minimum: G >= 2k groups) */
    if (count_ge(gm, G, hi_) < k) {
        for (int it = 0; it < 32; it++) {
            float mid = lo + 0.5f * (hi_ - lo);
            if (!(mid > lo && mid < hi_)) break;
            i64 c = count_ge(gm, G, mid);
            if (c >= k) { lo = mid; if (c <= k + k / 4 + 2) break; }
            else hi_ = mid;
        }
        t = lo;
    }
    for (i64 j = 0; j < k; j++) { hv[j] = -__builtin_inff(); hi[j] = -1; }
    i64 j = 0;
#if defined(__AVX512F__)
    const __m512 tv = _mm512_set1_ps(t);
    for (; j + 16 <= s; j += 16) {
        if (next) __builtin_prefetch(next + j, 0, 2); /* the next row streams in while this one finishes */
        __m512 v = _mm512_loadu_ps(kp + j);
        __mmask16 m = _mm512_cmp_ps_mask(v, tv, _CMP_GE_OQ) & _mm512_cmp_ps_mask(v, _mm512_set1_ps(hv[0]), _CMP_GT_OQ);
        while (m) { int q = __builtin_ctz(m); m &= m - 1; offer(hv, hi, k, kp[j + q], j + q); }
    }
#elif defined(__AVX2__)
    const __m256 tv = _mm256_set1_ps(t);
    for (; j + 8 <= s; j += 8) {
        if (next && j % 16 == 0) __builtin_prefetch(next + j, 0, 2);
        __m256 v = _mm256_loadu_ps(kp + j);
        int m = _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(v, tv, _CMP_GE_OQ),
                                                 _mm256_cmp_ps(v, _mm256_set1_ps(hv[0]), _CMP_GT_OQ)));
        while (m) { int q = __builtin_ctz(m); m &= m - 1; offer(hv, hi, k, kp[j + q], j + q); }
    }
#endif
    for (; j < s; j++)
        if (kp[j] >= t) offer(hv, hi, k, kp[j], j);
finish:
    if (bias || gate)
        for (i64 q = 0; q < k; q++) hv[q] = bias ? row[hi[q]] + bias[hi[q]] : row[hi[q]];
}

void sae_topk(i64 n, i64 s, const float *h, i64 ldh, const float *bias, const float *gate, i64 k,
              float *vals, i32 *idx, int nt) {
    (void)nt; /* unused without OpenMP */
    if (k <= 0) return;
    #pragma omp parallel num_threads(nt)
    {
        float *scratch = (float *)malloc(2 * (size_t)(s > 0 ? s : 1) * sizeof(float));
        #pragma omp for schedule(static)
        for (i64 r = 0; r < n; r++)
            topk_row(h + r * ldh, s, bias, gate, k, vals + r * k, idx + r * k, scratch, scratch + s,
                     r + 1 < n ? h + (r + 1) * ldh : 0);
        free(scratch);
    }
}

/* out[r] = bias + sum_p val[perm ? perm[p] : p] * B[col[p]]; rowsum[r] = sum of those values */
void sae_spmm(i64 n_rows, const i32 *crow, const i32 *col, const float *val, const i32 *perm,
              const float *B, i64 ldb, i64 d, const float *bias, float *out, i64 ldo, float *rowsum, int nt) {
    (void)nt; /* unused without OpenMP */
    #pragma omp parallel for schedule(dynamic, 16) num_threads(nt)
    for (i64 r = 0; r < n_rows; r++) {
        float *restrict o = out + r * ldo;
        if (bias) memcpy(o, bias, d * sizeof(float));
        else memset(o, 0, d * sizeof(float));
        float rs = 0.f;
        i64 p = crow[r], end = crow[r + 1];
        for (; p + 4 <= end; p += 4) {
            float v0 = val[perm ? perm[p] : p], v1 = val[perm ? perm[p + 1] : p + 1];
            float v2 = val[perm ? perm[p + 2] : p + 2], v3 = val[perm ? perm[p + 3] : p + 3];
            const float *restrict b0 = B + (i64)col[p] * ldb, *restrict b1 = B + (i64)col[p + 1] * ldb;
            const float *restrict b2 = B + (i64)col[p + 2] * ldb, *restrict b3 = B + (i64)col[p + 3] * ldb;
            rs += v0 + v1 + v2 + v3;
            #pragma omp simd
            for (i64 t = 0; t < d; t++) o[t] += v0 * b0[t] + v1 * b1[t] + v2 * b2[t] + v3 * b3[t];
        }
        for (; p < end; p++) {
            float v = val[perm ? perm[p] : p];
            const float *restrict b = B + (i64)col[p] * ldb;
            rs += v;
            #pragma omp simd
            for (i64 t = 0; t < d; t++) o[t] += v * b[t];
        }
        if (rowsum) rowsum[r] = rs;
    }
}

/* out[p] = A[r] . B[col[p]] for every stored p of row r */
void sae_sddmm(i64 n_rows, const i32 *crow, const i32 *col, const float *A, i64 lda, const float *B, i64 ldb,
               i64 d, float *out, int nt) {
    (void)nt; /* unused without OpenMP */
    #pragma omp parallel for schedule(dynamic, 16) num_threads(nt)
    for (i64 r = 0; r < n_rows; r++) {
        const float *restrict a = A + r * lda;
        i64 p = crow[r], end = crow[r + 1];
        for (; p + 4 <= end; p += 4) { /* four independent sums: not bound by the FMA latency of one */
            const float *restrict b0 = B + (i64)col[p] * ldb, *restrict b1 = B + (i64)col[p + 1] * ldb;
            const float *restrict b2 = B + (i64)col[p + 2] * ldb, *restrict b3 = B + (i64)col[p + 3] * ldb;
            float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
            #pragma omp simd reduction(+:s0, s1, s2, s3)
            for (i64 t = 0; t < d; t++) { float at = a[t]; s0 += at * b0[t]; s1 += at * b1[t]; s2 += at * b2[t]; s3 += at * b3[t]; }
            out[p] = s0; out[p + 1] = s1; out[p + 2] = s2; out[p + 3] = s3;
        }
        for (; p < end; p++) {
            const float *restrict b = B + (i64)col[p] * ldb;
            float acc = 0.f;
            #pragma omp simd reduction(+:acc)
            for (i64 t = 0; t < d; t++) acc += a[t] * b[t];
            out[p] = acc;
        }
    }
}

/* CSR [n_rows, n_cols] -> CSR of the transpose, stable (rows ascending in each column); perm[q] is the
   position in the original order of the q-th transposed entry */
void sae_transpose(i64 n_rows, i64 n_cols, const i32 *crow, const i32 *col, i32 *crow_t, i32 *rows_t, i32 *perm) {
    memset(crow_t, 0, (n_cols + 1) * sizeof(i32));
    i64 nnz = crow[n_rows];
    for (i64 p = 0; p < nnz; p++) crow_t[col[p] + 1]++;
    for (i64 c = 0; c < n_cols; c++) crow_t[c + 1] += crow_t[c];
    i32 *next = (i32 *)malloc((n_cols > 0 ? n_cols : 1) * sizeof(i32));
    memcpy(next, crow_t, n_cols * sizeof(i32));
    for (i64 r = 0; r < n_rows; r++)
        for (i64 p = crow[r]; p < crow[r + 1]; p++) {
            i32 q = next[col[p]]++;
            rows_t[q] = (i32)r;
            perm[q] = (i32)p;
        }
    free(next);
}

/* h = relu(h + bias) in place; row_nnz[r] = non-zeros of row r; colsum (if given) = column sums;
   returns the total number of non-zeros */
i64 sae_relu_bias(i64 n, i64 s, float *h, i64 ldh, const float *bias, i32 *row_nnz, float *colsum, int nt) {
    i64 total = 0;
    int nthreads = nt > 0 ? nt : 1;
    float *part = colsum ? (float *)calloc((size_t)nthreads * s, sizeof(float)) : 0;
    #pragma omp parallel num_threads(nthreads) reduction(+:total)
    {
        float *restrict acc = part ? part + (i64)omp_get_thread_num() * s : 0;
        #pragma omp for schedule(static)
        for (i64 r = 0; r < n; r++) {
            float *restrict row = h + r * ldh;
            i32 cnt = 0;
            #pragma omp simd reduction(+:cnt)
            for (i64 j = 0; j < s; j++) {
                float v = row[j] + (bias ? bias[j] : 0.f);
                v = v < 0.f ? 0.f : v;
                row[j] = v;
                cnt += v != 0.f;
            }
            if (acc) {
                #pragma omp simd
                for (i64 j = 0; j < s; j++) acc[j] += row[j];
            }
            row_nnz[r] = cnt;
            total += cnt;
        }
    }
    if (part) {
        for (i64 j = 0; j < s; j++) {
            double t = 0.0;
            for (int q = 0; q < nthreads; q++) t += part[(i64)q * s + j];
            colsum[j] = (float)t;
        }
        free(part);
    }
    return total;
}

/* ReLU backward of df (in place) with a per-column term added where f > 0; colsum = column sums of the result */
void sae_relu_backward(i64 n, i64 s, float *df, i64 ldd, const float *f, i64 ldf, const float *colterm,
                       float *colsum, int nt) {
    int nthreads = nt > 0 ? nt : 1;
    float *part = (float *)calloc((size_t)nthreads * s, sizeof(float));
    #pragma omp parallel num_threads(nthreads)
    {
        float *restrict acc = part + (i64)omp_get_thread_num() * s;
        #pragma omp for schedule(static)
        for (i64 r = 0; r < n; r++) {
            float *restrict g = df + r * ldd;
            const float *restrict a = f + r * ldf;
            #pragma omp simd
            for (i64 j = 0; j < s; j++) {
                float v = (a[j] <= 0.f) ? 0.f : g[j] + (colterm ? colterm[j] : 0.f);
                g[j] = v;
                acc[j] += v;
            }
        }
    }
    for (i64 j = 0; j < s; j++) {
        double t = 0.0;
        for (int q = 0; q < nthreads; q++) t += part[(i64)q * s + j];
        colsum[j] = (float)t;
    }
    free(part);
}

/* the non-zeros of a dense [n, s] matrix into CSR arrays (crow given, from row counts) */
void sae_dense_to_csr(i64 n, i64 s, const float *h, i64 ldh, const i32 *crow, i32 *col, float *val, int nt) {
    (void)nt; /* unused without OpenMP */
    #pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 r = 0; r < n; r++) {
        const float *row = h + r * ldh;
        i64 p = crow[r], j = 0;
#if defined(__AVX512F__)
        const __m512i step = _mm512_set1_epi32(16);
        __m512i jv = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        for (; j + 16 <= s; j += 16, jv = _mm512_add_epi32(jv, step)) {
            __m512 v = _mm512_loadu_ps(row + j);
            __mmask16 m = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_NEQ_UQ);
            if (m) { /* compress in registers, then a contiguous masked store (compress-to-memory is slow on Zen 4) */
                int c = __builtin_popcount(m);
                __mmask16 first = (__mmask16)((1u << c) - 1u);
                _mm512_mask_storeu_ps(val + p, first, _mm512_maskz_compress_ps(m, v));
                _mm512_mask_storeu_epi32(col + p, first, _mm512_maskz_compress_epi32(m, jv));
                p += c;
            }
        }
#endif
        for (; j < s; j++)
            if (row[j] != 0.f) { col[p] = (i32)j; val[p] = row[j]; p++; }
    }
}
