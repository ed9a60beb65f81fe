/* Optional compiled loops for the user-level mechanism's device side (ftte.privacy.native).
 *
 * Why C: the table sampler's fast path and the rounding are a handful of integer operations per
 * coordinate; as numpy passes they cost several memory sweeps each (about 7 ms and 2.5 ms per
 * million coordinates on the bench machine), as one loop about a third of that. Every function
 * here mirrors a numpy definition in ftte.privacy.distributed_dp or ftte.protocol.user_encoding
 * operation for operation; the tests check that both give the same values, bit for bit, on the
 * same keystream. No floating-point contraction (-ffp-contract=off in pyproject.toml): the
 * rounding's double additions must round exactly as numpy's do.
 *
 * Inputs are buffers the Python wrapper allocated and sized; every length is still checked here
 * before anything is read or written.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <stdint.h>

#if !defined(FLT_EVAL_METHOD) || FLT_EVAL_METHOD != 0
#error "float and double arithmetic must round to their own types (not x87 extended precision): numpy's values are the definition"
#endif
#include <string.h>

#define TABLE_SIZE 65536
#define REJECTED INT32_MIN /* no accepted draw has this value: magnitudes stay below 2^31 */

static int check_buffer(Py_buffer *b, Py_ssize_t items, Py_ssize_t itemsize, const char *name) {
    if (b->len != items * itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd bytes, got %zd", name, items * itemsize, b->len);
        return 0;
    }
    return 1;
}

/* dg_batch(words, chunk, thr, lo, guide, low, bias, mask, spare, c, coef, value, pending) -> number pending
 *
 * The table sampler over a batch of k attempts (2 words each), every decision taken as
 * ftte.privacy.distributed_dp takes it:
 *   words: chunk by chunk, a chunk of c attempts is c first words then c second words;
 *   fast path: second < thr[first >> 16] accepts +-(lo[idx] + (first & mask));
 *   full test: with bin = guide[idx] (bins = len(low) - 2 is the tail, bins + 1 the reject entries),
 *     p = bias[bin] * P(e), e = ((low[bin] + off) + low[bin]) * off * c, P the polynomial with
 *     coefficients coef (Horner, highest first: the same operations as _exp_poly), accepted when
 *     head < floor(p 2^31) (head = second >> 1), refused when above, and "-0" refused;
 *   tail entries (bin == bins): refused unless (first & spare) == 0 (the envelope's tail_select);
 *   pending: selected tail entries and ties (head == floor(p 2^31)), which need more
 *     keystream: their value is PENDING and their index is appended to pending, in attempt order.
 * value: int32, the signed draw, REJECTED or PENDING. */
#define PENDING (INT32_MIN + 1)

static PyObject *dg_batch(PyObject *self, PyObject *args) {
    Py_buffer words, thr, lo, guide, low, bias, coef, value, pending;
    Py_ssize_t chunk;
    unsigned long mask_in, spare_in;
    double c;
    if (!PyArg_ParseTuple(args, "y*ny*y*y*y*y*kkdy*w*w*", &words, &chunk, &thr, &lo, &guide, &low, &bias,
                          &mask_in, &spare_in, &c, &coef, &value, &pending))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t k = value.len / 4, degree = coef.len / 8 - 1, bins = low.len / 8 - 2;
    if (chunk < 1 || mask_in > 0xFFFFu || spare_in > 0xFFFFu || degree < 0 || degree > 64 || coef.len % 8) {
        PyErr_SetString(PyExc_ValueError, "dg_batch: chunk >= 1, masks below 2^16, 1 to 65 coefficients");
        goto done;
    }
    if (bins < 1 || low.len % 8) {
        PyErr_SetString(PyExc_ValueError, "dg_batch: low needs bins + 2 float64 entries, bins >= 1");
        goto done;
    }
    if (!check_buffer(&words, 2 * k, 4, "words") || !check_buffer(&thr, TABLE_SIZE, 4, "thr") ||
        !check_buffer(&lo, TABLE_SIZE, 4, "lo") || !check_buffer(&guide, TABLE_SIZE, 2, "guide") ||
        !check_buffer(&bias, bins + 2, 8, "bias") || !check_buffer(&value, k, 4, "value") ||
        !check_buffer(&pending, k, 8, "pending"))
        goto done;
    for (Py_ssize_t i = 0; i < TABLE_SIZE; i++) { /* every entry names a bin, the tail or the rejects */
        if (((const uint16_t *)guide.buf)[i] > bins + 1) {
            PyErr_SetString(PyExc_ValueError, "dg_batch: a guide entry beyond bins + 1");
            goto done;
        }
    }
    {
        const uint32_t *w = (const uint32_t *)words.buf;
        const uint32_t *t = (const uint32_t *)thr.buf, *l = (const uint32_t *)lo.buf;
        const double *lw = (const double *)low.buf, *bs = (const double *)bias.buf, *cf = (const double *)coef.buf;
        const uint16_t *gd = (const uint16_t *)guide.buf;
        int32_t *v = (int32_t *)value.buf;
        int64_t *pd = (int64_t *)pending.buf;
        const uint32_t mask = (uint32_t)mask_in, spare_mask = (uint32_t)spare_in;
        Py_ssize_t n_pending = 0, n_slow = 0;
        /* the full test runs in a second pass over the undecided attempts, so that the polynomial
         * (a chain of dependent operations per attempt) is evaluated across attempts at once */
        Py_ssize_t cap = k / 16 + 4096; /* about 5 % of attempts are undecided; grown when needed */
        Py_ssize_t *slow = PyMem_RawMalloc((size_t)cap * sizeof(Py_ssize_t));
        uint64_t *ab = PyMem_RawMalloc((size_t)cap * sizeof(uint64_t)); /* the attempt's two words */
        double *e = NULL, *mag = NULL;
        int grown_ok = 1, bad_probability = 0;
        if (!slow || !ab) {
            PyMem_RawFree(slow);
            PyMem_RawFree(ab);
            PyErr_NoMemory();
            goto done;
        }
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t start = 0; start < k; start += chunk) {
            Py_ssize_t cc = k - start < chunk ? k - start : chunk;
            const uint32_t *first = w + 2 * start, *second = first + cc;
            for (Py_ssize_t i = 0; i < cc; i++) {
                uint32_t a = first[i], b = second[i], idx = a >> 16;
                if (b < t[idx]) {
                    uint32_t neg = 0u - (b & 1u);
                    v[start + i] = (int32_t)(((l[idx] + (a & mask)) ^ neg) - neg);
                } else {
                    v[start + i] = PENDING; /* decided below */
                    if (n_slow == cap) {
                        Py_ssize_t *grown = PyMem_RawRealloc(slow, (size_t)(2 * cap) * sizeof(Py_ssize_t));
                        if (grown) slow = grown;
                        uint64_t *grown_ab = grown ? PyMem_RawRealloc(ab, (size_t)(2 * cap) * sizeof(uint64_t)) : NULL;
                        if (!grown_ab) { grown_ok = 0; goto scanned; }
                        ab = grown_ab;
                        cap *= 2;
                    }
                    ab[n_slow] = (uint64_t)a | ((uint64_t)b << 32);
                    slow[n_slow++] = start + i;
                }
            }
        }
        e = PyMem_RawMalloc((size_t)(n_slow ? n_slow : 1) * sizeof(double));
        mag = PyMem_RawMalloc((size_t)(n_slow ? n_slow : 1) * sizeof(double));
        if (!e || !mag) { grown_ok = 0; goto scanned; }
        for (Py_ssize_t j = 0; j < n_slow; j++) { /* the exponent, as _full_test computes it */
            uint32_t a = (uint32_t)ab[j];
            uint32_t off = a & mask;
            double lo_bin = lw[gd[a >> 16]];
            double m = lo_bin + (double)off;
            double x = m + lo_bin;
            x *= (double)off;
            x *= c;
            e[j] = x;
            mag[j] = m;
        }
        /* Horner, highest degree first, as _exp_poly; one coefficient at a time across every
         * attempt (mag holds the running value while e holds the exponent), so the loop is a
         * streaming multiply-add instead of one chain of dependent operations per attempt */
        double *acc = PyMem_RawMalloc((size_t)(n_slow ? n_slow : 1) * sizeof(double));
        if (!acc) { grown_ok = 0; goto scanned; }
        for (Py_ssize_t j = 0; j < n_slow; j++) acc[j] = cf[0];
        for (Py_ssize_t d = 1; d <= degree; d++) {
            const double cd = cf[d];
            for (Py_ssize_t j = 0; j < n_slow; j++) {
                double p = acc[j] * e[j];
                acc[j] = p + cd;
            }
        }
        for (Py_ssize_t j = 0; j < n_slow; j++) e[j] = acc[j];
        PyMem_RawFree(acc);
        for (Py_ssize_t j = 0; j < n_slow; j++) { /* the decisions, in attempt order (so is pending) */
            Py_ssize_t at = slow[j];
            uint32_t a = (uint32_t)ab[j], b = (uint32_t)(ab[j] >> 32);
            uint16_t bin = gd[a >> 16];
            if (bin == bins) { /* the tail: proposed only when its spare bits are zero, then it needs
                                * more keystream (left PENDING); otherwise refused */
                if ((a & spare_mask) == 0) {
                    pd[n_pending++] = at;
                } else {
                    v[at] = REJECTED;
                }
                continue;
            }
            double p = e[j] * bs[bin];
            double top = p * 2147483648.0; /* exact; p lies in [0, 1] */
            if (!(top >= 0.0 && top <= 2147483648.0)) { /* only a malformed table or polynomial */
                bad_probability = 1;
                break;
            }
            double floor_top = (double)(int64_t)top;
            double head = (double)(b >> 1);
            uint32_t neg = 0u - (b & 1u);
            if (head < floor_top)
                v[at] = (mag[j] == 0.0 && (b & 1u)) ? REJECTED /* "-0" would count zero twice */
                                                     : (int32_t)((((uint32_t)mag[j]) ^ neg) - neg);
            else if (head == floor_top) {
                v[at] = PENDING;
                pd[n_pending++] = at;
            } else
                v[at] = REJECTED;
        }
    scanned:
        Py_END_ALLOW_THREADS
        PyMem_RawFree(slow);
        PyMem_RawFree(ab);
        PyMem_RawFree(e);
        PyMem_RawFree(mag);
        if (bad_probability)
            PyErr_SetString(PyExc_ValueError, "dg_batch: an acceptance probability outside [0, 1]");
        else
            result = grown_ok ? PyLong_FromSsize_t(n_pending) : PyErr_NoMemory();
    }
done:
    PyBuffer_Release(&words);
    PyBuffer_Release(&thr);
    PyBuffer_Release(&lo);
    PyBuffer_Release(&guide);
    PyBuffer_Release(&low);
    PyBuffer_Release(&bias);
    PyBuffer_Release(&coef);
    PyBuffer_Release(&value);
    PyBuffer_Release(&pending);
    return result;
}

/* dg_compact(value, out, out_bytes) -> number written: the accepted values (not REJECTED; no value
 * is PENDING any more when this runs) of value,
 * in order, into out (int64 or int32 by out_bytes = 8 or 4), stopping when out is full. */
static PyObject *dg_compact(PyObject *self, PyObject *args) {
    Py_buffer value, out;
    Py_ssize_t out_bytes;
    if (!PyArg_ParseTuple(args, "y*w*n", &value, &out, &out_bytes))
        return NULL;
    PyObject *result = NULL;
    if (value.len % 4 || (out_bytes != 4 && out_bytes != 8) || out.len % out_bytes) {
        PyErr_SetString(PyExc_ValueError, "dg_compact: value must hold int32, out int32 or int64");
        goto done;
    }
    {
        const int32_t *v = (const int32_t *)value.buf;
        Py_ssize_t k = value.len / 4, room = out.len / out_bytes, n = 0;
        Py_BEGIN_ALLOW_THREADS
        if (out_bytes == 8) {
            int64_t *o = (int64_t *)out.buf;
            for (Py_ssize_t i = 0; i < k && n < room; i++) {
                int32_t x = v[i];
                o[n] = x;
                n += x != REJECTED;
            }
        } else {
            int32_t *o = (int32_t *)out.buf;
            for (Py_ssize_t i = 0; i < k && n < room; i++) {
                int32_t x = v[i];
                o[n] = x;
                n += x != REJECTED;
            }
        }
        Py_END_ALLOW_THREADS
        result = PyLong_FromSsize_t(n);
    }
done:
    PyBuffer_Release(&value);
    PyBuffer_Release(&out);
    return result;
}

/* round_ring(y, words, noise, limit_sq, total, ring) -> total + ||q||^2, saturated, or -1
 *
 * One piece of the device's rounding: q = floor(y + k 2^-32) for float32 y and uint32 keystream
 * words k, computed in double exactly as numpy does (k 2^-32 is exact, then one rounded addition,
 * then floor); ring = (q + noise) mod 2^b, noise int32, with b = 8 * the ring's item size (2 or 4
 * bytes, from the ring's length in bytes over y's; the wrapper checks its dtype). The squared norm
 * is added to total in integers and stops growing once past limit_sq (< 2^63), so it cannot
 * overflow. -1 if some |y + u| reaches 2^31 - 1 or is not finite (the ring cannot hold it). */
static PyObject *round_ring(PyObject *self, PyObject *args) {
    Py_buffer y, words, noise, ring;
    unsigned long long limit, total;
    if (!PyArg_ParseTuple(args, "y*y*y*KKw*", &y, &words, &noise, &limit, &total, &ring))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = y.len / 4;
    Py_ssize_t ring_bytes = n ? ring.len / n : 4;
    if ((ring_bytes != 2 && ring_bytes != 4) || limit >= (1ULL << 63)) {
        PyErr_SetString(PyExc_ValueError, "round_ring: ring items of 2 or 4 bytes, limit below 2^63");
        goto done;
    }
    if (!check_buffer(&y, n, 4, "y") || !check_buffer(&words, n, 4, "words") ||
        !check_buffer(&noise, n, 4, "noise") || !check_buffer(&ring, n, ring_bytes, "ring"))
        goto done;
    {
        const float *yy = (const float *)y.buf;
        const uint32_t *w = (const uint32_t *)words.buf;
        const int32_t *z = (const int32_t *)noise.buf;
        uint32_t *r32 = (uint32_t *)ring.buf;
        uint16_t *r16 = (uint16_t *)ring.buf;
        int in_range = 1;
        const double unit = 1.0 / 4294967296.0;
        if (total > limit) total = limit + 1;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n; i++) {
            double u = (double)w[i] * unit;
            u += (double)yy[i];
            /* floor without libm: in range, truncation toward zero then one down for a negative
             * non-integer, which is floor exactly */
            if (!(u > -2147483647.0 && u < 2147483647.0)) { in_range = 0; u = 0.0; }
            int64_t x = (int64_t)u;
            x -= (double)x > u;
            uint64_t sum = (uint64_t)x + (uint64_t)(int64_t)z[i];
            if (ring_bytes == 4) r32[i] = (uint32_t)sum; else r16[i] = (uint16_t)sum;
            if (total <= limit) total += (unsigned long long)(x * x);
        }
        Py_END_ALLOW_THREADS
        if (total > limit) total = limit + 1;
        result = in_range ? PyLong_FromUnsignedLongLong(total) : PyLong_FromLong(-1);
    }
done:
    PyBuffer_Release(&y);
    PyBuffer_Release(&words);
    PyBuffer_Release(&noise);
    PyBuffer_Release(&ring);
    return result;
}

/* fwht_f32(y, factor): in place, the Walsh-Hadamard transform of a float32 vector of power-of-two
 * length times factor, with exactly the float32 operations of
 * ftte.protocol.user_encoding._fwht_inplace (radix-4 passes in blocks of 2^16, then across the
 * vector, then one radix-2 pass for an odd number of levels) followed by its "out *= factor" with
 * factor rounded to float32: the same values, bit for bit. */
static Py_ssize_t radix4_f32(float *y, Py_ssize_t n, Py_ssize_t h, float f, int scale_last) {
    while (4 * h <= n) {
        if (scale_last && 4 * h == n) { /* the transform's last pass: "out *= factor" folded in */
            for (Py_ssize_t g = 0; g < n; g += 4 * h) {
                float *a = y + g, *b = a + h, *c = b + h, *d = c + h;
                for (Py_ssize_t i = 0; i < h; i++) {
                    float s1 = a[i] + b[i], d1 = a[i] - b[i];
                    float s2 = c[i] + d[i], d2 = c[i] - d[i];
                    float ra = s2 + s1, rb = d2 + d1, rc = s1 - s2, rd = d1 - d2;
                    a[i] = ra * f;
                    b[i] = rb * f;
                    c[i] = rc * f;
                    d[i] = rd * f;
                }
            }
        } else {
            for (Py_ssize_t g = 0; g < n; g += 4 * h) {
                float *a = y + g, *b = a + h, *c = b + h, *d = c + h;
                for (Py_ssize_t i = 0; i < h; i++) {
                    float s1 = a[i] + b[i], d1 = a[i] - b[i];
                    float s2 = c[i] + d[i], d2 = c[i] - d[i];
                    a[i] = s2 + s1;
                    b[i] = d2 + d1;
                    c[i] = s1 - s2;
                    d[i] = d1 - d2;
                }
            }
        }
        h *= 4;
    }
    return h;
}

static PyObject *fwht_f32(PyObject *self, PyObject *args) {
    Py_buffer y;
    double factor;
    if (!PyArg_ParseTuple(args, "w*d", &y, &factor))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = y.len / 4;
    if (y.len % 4 || n < 1 || (n & (n - 1))) {
        PyErr_SetString(PyExc_ValueError, "fwht_f32: a float32 vector of power-of-two length");
        goto done;
    }
    {
        float *v = (float *)y.buf;
        const Py_ssize_t block = n < 65536 ? n : 65536;
        const float f = (float)factor;
        const int scale = factor != 1.0; /* x * 1.0f == x: numpy skips it, and so may we */
        int levels = 0;
        while (((Py_ssize_t)1 << levels) < n) levels++;
        const int even = levels % 2 == 0;
        Py_BEGIN_ALLOW_THREADS
        Py_ssize_t h = 1;
        for (Py_ssize_t start = 0; start < n; start += block)
            h = radix4_f32(v + start, block, 1, f, scale && even && block == n);
        h = radix4_f32(v, n, h, f, scale && even);
        if (h < n) {
            for (Py_ssize_t i = 0; i < h; i++) {
                float a = v[i], b = v[i + h];
                float ra = a + b, rb = a - b;
                v[i] = scale ? ra * f : ra;
                v[i + h] = scale ? rb * f : rb;
            }
        }
        if (scale && n == 1) v[0] *= f;
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
done:
    PyBuffer_Release(&y);
    return result;
}

static PyMethodDef methods[] = {
    {"dg_batch", dg_batch, METH_VARARGS, "The table sampler over a batch of attempts, all but the pending ones."},
    {"dg_compact", dg_compact, METH_VARARGS, "The accepted draws of a batch, in order, into an int64 array."},
    {"fwht_f32", fwht_f32, METH_VARARGS, "The float32 Walsh-Hadamard transform, in place, as _fwht_inplace."},
    {"round_ring", round_ring, METH_VARARGS, "Unbiased rounding of a float32 vector, plus noise, into the ring."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
