/* The service's two hot loops in C: HoloMambaRec's serving step (holorec_step: unpack a user's stored state, one SSM
   step per layer, pack it again) and one user's top-k (holorec_top, at the end).

   An event's step is about a hundred thousand multiply-adds. ONNX Runtime runs it as some sixty ops dispatched one
   by one, each with its own buffers; here it is one function over one weight array and a few stack vectors: for
   one user 0.066 ms against ONNX Runtime's 0.168 in `holorec bench step`, and an event's p50 in the service
   0.28-0.29 ms lower (bench/results/cpu-2026-12-08b-serve/README.md).

   model/fast_step.py (native_step) builds the weight array, loads this file's shared library with ctypes and
   checks it against the eager `step` before the service uses it; it covers the configurations it names there
   (pre-norm SSM blocks, the GELU feed-forward or none, a final LayerNorm) and every state codec of model/state.py.
   The arithmetic is the eager step's (model/ssm.py SelectiveSSM.step, model/holomamba.py), in float32, in the
   same order where the order is the eager code's own, but for exp and log, which are this file's own (exp_, log_:
   within a few ulp of libm's); the bytes written are model/state.py's pack.

   Weights, one float32 array, per layer in order (W^T: a Linear's weight transposed, (in, out) row-major):
     ln_w ln_b (d), in W^T (d, 2e), in_b (2e), conv_w (e, k), conv_b (e), x W^T (e, r + 2n), dt W^T (r, e),
     dt_b (e), A = -exp(A_log) (e, n), D (e), out W^T (e, d), out_b (d),
     then with a feed-forward (f > 0): ln_w ln_b (d), W1^T (d, f), b1 (f), W2^T (f, d), b2 (d);
   after the layers the final LayerNorm's w and b (d). Item inputs: rows of the item table (v, d) times `scale`.
*/
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { F32 = 0, F16 = 1, I8 = 2, I8_ROWS = 3 }; /* model/state.py CODECS */
enum { D, E, N, R, K, F, LAYERS, V, CODEC, SIZE, HEADER }; /* dims[]: the header, then 6 ints per layer (placement) */

static void layer_norm(const float *x, const float *w, const float *b, float *out, int d) {
    float mean = 0.0f, var = 0.0f;
    for (int i = 0; i < d; i++) mean += x[i];
    mean /= (float)d;
    for (int i = 0; i < d; i++) var += (x[i] - mean) * (x[i] - mean);
    float rstd = 1.0f / sqrtf(var / (float)d + 1e-5f);
    for (int i = 0; i < d; i++) out[i] = (x[i] - mean) * rstd * w[i] + b[i];
}

/* y (out) = x (in) @ W^T (in, out) + bias: the inner loop runs along rows of W^T, so it vectorises; four rows a pass
   keep y[o] in a register for four products instead of a load and a store each, adding them in the same order as one
   row a pass would (the same bits) */
static void linear(const float *restrict x, const float *restrict wt, const float *restrict bias, float *restrict y, int in, int out) {
    memset(y, 0, sizeof(float) * (size_t)out);
    int i = 0;
    for (; i + 4 <= in; i += 4) {
        const float x0 = x[i], x1 = x[i + 1], x2 = x[i + 2], x3 = x[i + 3], *r0 = wt + (size_t)i * out;
        const float *r1 = r0 + out, *r2 = r1 + out, *r3 = r2 + out;
        for (int o = 0; o < out; o++) {
            float acc = y[o];
            acc += x0 * r0[o];
            acc += x1 * r1[o];
            acc += x2 * r2[o];
            acc += x3 * r3[o];
            y[o] = acc;
        }
    }
    for (; i < in; i++) {
        const float xi = x[i], *row = wt + (size_t)i * out;
        for (int o = 0; o < out; o++) y[o] += xi * row[o];
    }
    if (bias)
        for (int o = 0; o < out; o++) y[o] += bias[o];
}

static float max(float a, float b) { return a > b ? a : b; } /* fmaxf without its NaN rule: a call, not an instruction */
static float min(float a, float b) { return a < b ? a : b; }
/* e^x without a libm call, so the loops over a layer's channels vectorise (libm's expf and log1pf were among a step's
   largest parts; the loops vectorise with -fno-trapping-math, pyproject.toml, which lets the compiler compute both sides of
   a condition, and changes no result): x = k ln2 + r, |r| <= ln2 / 2, e^r by its Taylor series to r^7 (what is left
   out is under 1e-8 of it), 2^k put in the exponent bits. Within a few ulp of expf; 0 below -86 (e^x < 4.4e-38), and
   never a denormal, which costs the CPU a hundred cycles or more an operation (an SSM step's decays under -86 made the
   step slower in a scratch timing) */
static float exp_(float x) {
    const float given = x;
    x = min(max(x, -86.0f), 88.0f);
    const float k = (x * 1.44269504f + 0x1.8p23f) - 0x1.8p23f;  /* round(x / ln2), half to even, as in encode */
    const float r = (x - k * 0.693145752f) - k * 1.42860677e-6f;  /* ln2 in two parts: k ln2 exact to float precision */
    const float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720 + r * (1.0f / 5040)))))));
    const int32_t bits = ((int32_t)k + 127) << 23;  /* 2^k, k in [-126, 127] */
    float scale;
    memcpy(&scale, &bits, 4);
    return given < -86.0f ? 0.0f : p * scale;
}

/* ln u for a normal positive float, likewise: u = 2^j m, m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(t), t = (m - 1) / (m + 1),
   |t| <= 0.172, by its series to t^9 (the rest under 1e-9) */
static float log_(float u) {
    int32_t bits, j;
    memcpy(&bits, &u, 4);
    j = ((bits >> 23) & 0xff) - 127;
    bits = (bits & 0x7fffff) | 0x3f800000;
    float m;
    memcpy(&m, &bits, 4);
    const int big = m > 1.41421356f;
    m = big ? 0.5f * m : m;
    j += big;
    const float t = (m - 1.0f) / (m + 1.0f), t2 = t * t;
    const float ln_m = 2.0f * t * (1.0f + t2 * (1.0f / 3 + t2 * (1.0f / 5 + t2 * (1.0f / 7 + t2 * (1.0f / 9)))));
    return (float)j * 0.693145752f + ((float)j * 1.42860677e-6f + ln_m);
}

static float silu(float x) { return x / (1.0f + exp_(-x)); }
/* ln(1 + e^x), torch's threshold 20; ln(1 + y) as ln u less the rounding of u = 1 + y, so a small y keeps its digits */
static float softplus(float x) {
    const float y = exp_(x), u = 1.0f + y, ln = log_(u) - ((u - 1.0f) - y) / u;
    return x > 20.0f ? x : ln;
}
static float gelu(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

static float half_to_float(const uint8_t *p) { _Float16 h; memcpy(&h, p, 2); return (float)h; }
static void float_to_half(float x, uint8_t *p) { _Float16 h = (_Float16)x; memcpy(p, &h, 2); }

/* One tensor of a blob (model/state.py Plan: scales at s_at, `segs` of them, values at v_at) to n floats */
static void decode(const uint8_t *blob, int codec, const int32_t *at, int n, float *x) {
    const int s_at = at[0], segs = at[1], v_at = at[2];
    if (codec == F32) {
        memcpy(x, blob + v_at, sizeof(float) * (size_t)n);
    } else if (codec == F16) {
        for (int i = 0; i < n; i++) x[i] = half_to_float(blob + v_at + 2 * i);
    } else {
        const int per = n / segs;
        for (int s = 0; s < segs; s++) {
            float scale;
            if (codec == I8) memcpy(&scale, blob + s_at, 4);
            else scale = half_to_float(blob + s_at + 2 * s);
            for (int i = s * per; i < (s + 1) * per; i++) x[i] = (float)(int8_t)blob[v_at + i] * scale;
        }
    }
}

/* n floats to their bytes in a blob, as model/state.py's pack writes them: x ~ scale * q, q = rint(x / scale) */
static void encode(const float *x, int codec, const int32_t *at, int n, uint8_t *blob) {
    const int s_at = at[0], segs = at[1], v_at = at[2];
    if (codec == F32) {
        memcpy(blob + v_at, x, sizeof(float) * (size_t)n);
    } else if (codec == F16) {
        for (int i = 0; i < n; i++) float_to_half(x[i], blob + v_at + 2 * i);
    } else {
        const int per = n / segs;
        for (int s = 0; s < segs; s++) {
            float peak = 0.0f, div;
            for (int i = s * per; i < (s + 1) * per; i++) peak = max(peak, fabsf(x[i]));
            if (codec == I8) {
                div = max(peak, 1e-30f) / 127.0f;
                memcpy(blob + s_at, &div, 4);
            } else { /* a float16 scale within its range; the values divided by the scale as stored */
                _Float16 h = (_Float16)(min(max(peak, 0x1p-14f), 6e4f) / 127.0f);
                memcpy(blob + s_at + 2 * s, &h, 2);
                div = (float)h;
            }
            /* rint, then clip to +-127, as numpy: clipped first, as the same; rounded half to even by adding and
               taking away 1.5 * 2^23 (exact below 2^22), which the compiler vectorises, where rintf is a call */
            for (int i = s * per; i < (s + 1) * per; i++) {
                float q = min(max(x[i] / div, -127.0f), 127.0f);
                blob[v_at + i] = (uint8_t)(int8_t)((q + 0x1.8p23f) - 0x1.8p23f);
            }
        }
    }
}

/* b users, one item each: in (b, size) blobs -> out (b, size) blobs, vec (b, d) user vectors.
   -> 0, or -1 for an item outside the table (nothing written for that user or after). */
int holorec_step(const int32_t *dims, const float *weights, const float *table, float scale, const int64_t *items,
                 int32_t b, const uint8_t *in, uint8_t *out, float *vec) {
    const int d = dims[D], e = dims[E], n = dims[N], r = dims[R], k = dims[K], f = dims[F], codec = dims[CODEC];
    const int64_t v = dims[V];
    const size_t size = (size_t)dims[SIZE];
    float x[d], normed[d], o[d], uz[2 * e], us[e], dbc[r + 2 * n], dt[e], y[e], conv[e * (k - 1)], h[e * n], dA[e * n];
    float hid[f > 0 ? f : 1];
    for (int32_t user = 0; user < b; user++) {
        if (items[user] < 0 || items[user] >= v) return -1;
        const uint8_t *blob = in + user * size;
        uint8_t *dst = out + user * size;
        memcpy(dst, blob, size);  /* bytes no tensor owns (none today) stay as they were */
        const float *row = table + items[user] * d, *w = weights;
        for (int i = 0; i < d; i++) x[i] = row[i] * scale;
        for (int l = 0; l < dims[LAYERS]; l++) {
            const int32_t *conv_at = dims + HEADER + 6 * l, *ssm_at = conv_at + 3;
            const float *ln_w = w, *ln_b = w + d, *in_wt = ln_b + d, *in_b = in_wt + d * 2 * e, *conv_w = in_b + 2 * e;
            const float *conv_b = conv_w + e * k, *x_wt = conv_b + e, *dt_wt = x_wt + e * (r + 2 * n), *dt_b = dt_wt + r * e;
            const float *A = dt_b + e, *Dp = A + e * n, *out_wt = Dp + e, *out_b = out_wt + e * d;
            w = out_b + d;
            decode(blob, codec, conv_at, e * (k - 1), conv);
            decode(blob, codec, ssm_at, e * n, h);
            layer_norm(x, ln_w, ln_b, normed, d);
            linear(normed, in_wt, in_b, uz, d, 2 * e);  /* u = uz[:e], z = uz[e:] */
            for (int c = 0; c < e; c++) {  /* the causal depthwise conv over the last k inputs, then the window slides */
                const float *cw = conv_w + c * k;
                float *win = conv + c * (k - 1), acc = 0.0f;
                for (int j = 0; j < k - 1; j++) acc += win[j] * cw[j];
                acc += uz[c] * cw[k - 1];
                us[c] = silu(acc + conv_b[c]);
                if (k > 1) {
                    memmove(win, win + 1, sizeof(float) * (size_t)(k - 2));
                    win[k - 2] = uz[c];
                }
            }
            linear(us, x_wt, NULL, dbc, e, r + 2 * n);  /* dt's low-rank input (r), B (n), C (n) */
            linear(dbc, dt_wt, dt_b, dt, r, e);
            const float *B = dbc + r, *C = dbc + r + n;
            for (int c = 0; c < e; c++) dt[c] = softplus(dt[c]);
            for (int c = 0; c < e; c++)
                for (int s = 0; s < n; s++) dA[c * n + s] = exp_(dt[c] * A[c * n + s]);
            for (int c = 0; c < e; c++) {
                const float du = dt[c] * us[c];
                float acc = 0.0f;
                for (int s = 0; s < n; s++) h[c * n + s] = dA[c * n + s] * h[c * n + s] + du * B[s];
                for (int s = 0; s < n; s++) acc += h[c * n + s] * C[s];
                y[c] = (acc + Dp[c] * us[c]) * silu(uz[e + c]);
            }
            linear(y, out_wt, out_b, o, e, d);
            for (int i = 0; i < d; i++) x[i] += o[i];
            encode(conv, codec, conv_at, e * (k - 1), dst);
            encode(h, codec, ssm_at, e * n, dst);
            if (f > 0) {  /* x + W2 GELU(W1 LN(x) + b1) + b2 */
                const float *fl_w = w, *fl_b = w + d, *w1t = fl_b + d, *b1 = w1t + d * f, *w2t = b1 + f, *b2 = w2t + f * d;
                w = b2 + d;
                layer_norm(x, fl_w, fl_b, normed, d);
                linear(normed, w1t, b1, hid, d, f);
                for (int i = 0; i < f; i++) hid[i] = gelu(hid[i]);
                linear(hid, w2t, b2, o, f, d);
                for (int i = 0; i < d; i++) x[i] += o[i];
            }
        }
        layer_norm(x, w, w + d, vec + user * d, d);
    }
    return 0;
}

/* One user's best k items (service/scoring.py): score i = q . column i of table_t (c, v), the scoring table
   transposed, each sum in the order of q's entries, written to `scores` (v); with table_t NULL, `scores` holds them
   already (a batch's product, which torch's matrix product does faster than one pass per user); `banned` items, items `keep` (v, or NULL) does not keep and
   items the seen filter reports (model/seen.py: `bits`, or NULL for none, and per item n_hash byte positions and
   masks, (n_hash, v) each) are left out, and so are scores of -inf (banned ones are set so). Writes idx and val best
   first, the earlier item first among equal scores; -> how many (fewer than k where fewer are left). The filter is
   asked only about an item good enough to enter the best k so far: a handful of lookups, not one per item. */
int holorec_top(const float *table_t, int32_t c, int32_t v, const float *q, const int32_t *banned, int32_t n_banned,
                const uint8_t *keep, const uint8_t *bits, const int64_t *f_byte, const uint8_t *f_mask, int32_t n_hash,
                int32_t k, float *scores, int64_t *idx, float *val) {
    if (table_t) linear(q, table_t, NULL, scores, c, v);  /* (c) @ (c, v) */
    for (int b = 0; b < n_banned; b++)
        if (banned[b] >= 0 && banned[b] < v) scores[banned[b]] = -INFINITY;
    int n = 0;
    for (int i = 0; i < v; i++) {
        if (n == k && i % 16 == 0 && i + 16 <= v) {  /* skip 16 scores at once when none beats the k-th best (vectorises) */
            const float worst = val[k - 1];
            int better = 0;
            for (int j = 0; j < 16; j++) better |= scores[i + j] > worst;
            if (!better) {
                i += 15;
                continue;
            }
        }
        const float s = scores[i];
        if (s == -INFINITY || (keep && !keep[i]) || (n == k && !(s > val[k - 1]))) continue;
        if (bits) {
            int seen = 1;
            for (int h = 0; h < n_hash && seen; h++) seen = (bits[f_byte[(size_t)h * v + i]] & f_mask[(size_t)h * v + i]) != 0;
            if (seen) continue;
        }
        int p = n < k ? n++ : k - 1;  /* the slot it takes, then up past every worse score */
        for (; p > 0 && val[p - 1] < s; p--) {
            val[p] = val[p - 1];
            idx[p] = idx[p - 1];
        }
        val[p] = s;
        idx[p] = i;
    }
    return n;
}
