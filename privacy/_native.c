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
#include <stdint.h>
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

/* dg_fast(words, chunk, thr, lo, mask, value, slow) -> number of attempts left to the full test
 *
 * words: the k attempts' uint32 keystream words, chunk by chunk: a chunk of c attempts is c first
 * words then c second words. An attempt whose second word is below thr[first >> 16] is accepted:
 * value = +-(lo[first >> 16] + (first & mask)), minus when bit 0 of the second word is set. Every
 * other attempt gets value REJECTED and its index appended to slow (int64), in attempt order. */
static PyObject *dg_fast(PyObject *self, PyObject *args) {
    Py_buffer words, thr, lo, value, slow;
    Py_ssize_t chunk;
    unsigned long mask_in;
    if (!PyArg_ParseTuple(args, "y*ny*y*kw*w*", &words, &chunk, &thr, &lo, &mask_in, &value, &slow))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t k = value.len / 4;
    if (chunk < 1 || mask_in > 0xFFFFu) {
        PyErr_SetString(PyExc_ValueError, "dg_fast: chunk must be >= 1 and the mask below 2^16");
        goto done;
    }
    if (!check_buffer(&words, 2 * k, 4, "words") || !check_buffer(&thr, TABLE_SIZE, 4, "thr") ||
        !check_buffer(&lo, TABLE_SIZE, 4, "lo") || !check_buffer(&value, k, 4, "value") ||
        !check_buffer(&slow, k, 8, "slow"))
        goto done;
    {
        const uint32_t *w = (const uint32_t *)words.buf;
        const uint32_t *t = (const uint32_t *)thr.buf;
        const uint32_t *l = (const uint32_t *)lo.buf;
        int32_t *v = (int32_t *)value.buf;
        int64_t *s = (int64_t *)slow.buf;
        const uint32_t mask = (uint32_t)mask_in;
        Py_ssize_t n_slow = 0;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t start = 0; start < k; start += chunk) {
            Py_ssize_t c = k - start < chunk ? k - start : chunk;
            const uint32_t *first = w + 2 * start, *second = first + c;
            for (Py_ssize_t i = 0; i < c; i++) {
                uint32_t a = first[i], b = second[i], idx = a >> 16;
                if (b < t[idx]) {
                    uint32_t neg = 0u - (b & 1u);
                    v[start + i] = (int32_t)(((l[idx] + (a & mask)) ^ neg) - neg);
                } else {
                    v[start + i] = REJECTED;
                    s[n_slow++] = start + i;
                }
            }
        }
        Py_END_ALLOW_THREADS
        result = PyLong_FromSsize_t(n_slow);
    }
done:
    PyBuffer_Release(&words);
    PyBuffer_Release(&thr);
    PyBuffer_Release(&lo);
    PyBuffer_Release(&value);
    PyBuffer_Release(&slow);
    return result;
}

/* dg_compact(value, out, out_bytes) -> number written: the accepted values (not REJECTED) of value,
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
 * then floor); ring = (q + noise) mod 2^b, noise int32 with b = 8 * the ring's item size (2 or 4 bytes, from
 * the buffer's format). The squared norm is added to total in integers and stops growing once past
 * limit_sq (< 2^63), so it cannot overflow. -1 if some |q| reaches 2^31 (the ring cannot hold it). */
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

static PyMethodDef methods[] = {
    {"dg_fast", dg_fast, METH_VARARGS, "The table sampler's fast path over a batch of attempts."},
    {"dg_compact", dg_compact, METH_VARARGS, "The accepted draws of a batch, in order, into an int64 array."},
    {"round_ring", round_ring, METH_VARARGS, "Unbiased rounding of a float32 vector, plus noise, into the ring."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
