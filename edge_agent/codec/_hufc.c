/* The HUF plane decoder's inner loop, compiled (docs/codec.md, "Compiled decoder").
 *
 * edge_agent.codec._huffman parses and validates a HUF plane (docs/wire-format.md,
 * "HUF planes") and builds its lookup table; this module only walks the lanes. It is an
 * optional speed-up: without it (no C compiler at install time) the same loop runs in
 * numpy, with the same results and the same errors (tests/test_codec_huffman.py runs
 * its tests with both; tests/test_codec_hufc.py compares them on corrupted planes).
 *
 * decode(stream, starts, ends, per, table, out) -> int
 *   stream  bytes-like: the bitstream, most significant bit first
 *   starts  bytes-like: one native int64 per lane, the bit where the lane starts
 *   ends    bytes-like: one native int64 per lane, the bit where it must end
 *   per     symbols per lane
 *   table   bytes-like: 4096 native uint16, indexed by the next 12 bits of the stream:
 *           symbol | code length << 8 (length 0: no code starts with these bits)
 *   out     writable bytes-like of lanes * per bytes: lane after lane
 * Returns -1, or the index of the first lane that is malformed (a bit pattern that is no
 * code, or a lane that does not end where its length says). Reads never leave the stream:
 * bits past its end read as zeros. Runs without the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define MAX_BITS 12
#define GROUP 8

static PyObject *
hufc_decode(PyObject *self, PyObject *args)
{
    Py_buffer s, st, en, tb, out;
    Py_ssize_t per;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "y*y*y*ny*w*", &s, &st, &en, &per, &tb, &out))
        return NULL;
    Py_ssize_t lanes = st.len / (Py_ssize_t)sizeof(int64_t);
    if (st.len % (Py_ssize_t)sizeof(int64_t) || en.len != st.len || per < 1
        || tb.len != (Py_ssize_t)(sizeof(uint16_t) << MAX_BITS) || out.len / per != lanes
        || out.len % per) {
        PyErr_SetString(PyExc_ValueError, "_hufc.decode: inconsistent buffer sizes");
        goto done;
    }
    {
        const uint8_t *buf = (const uint8_t *)s.buf;
        const int64_t nbytes = (int64_t)s.len;
        const int64_t nbits = nbytes * 8;
        const int64_t *starts = (const int64_t *)st.buf;
        const int64_t *ends = (const int64_t *)en.buf;
        const uint16_t *table = (const uint16_t *)tb.buf;
        uint8_t *o = (uint8_t *)out.buf;
        Py_ssize_t bad = -1;
        Py_BEGIN_ALLOW_THREADS
        /* GROUP lanes at a time, one symbol of each in turn: their chains of dependent
         * loads (the code's bits, then its table entry) overlap in the CPU */
        for (Py_ssize_t g = 0; g < lanes && bad < 0; g += GROUP) {
            int64_t p[GROUP];
            int width = lanes - g < GROUP ? (int)(lanes - g) : GROUP;
            for (int j = 0; j < width; j++) {
                p[j] = starts[g + j];
                if (p[j] < 0 || p[j] > nbits) {
                    bad = g + j;
                    break;
                }
            }
            for (Py_ssize_t i = 0; i < per && bad < 0; i++) {
                for (int j = 0; j < width; j++) {
                    int64_t q = p[j] >> 3;
                    uint32_t v;
                    if (q + 3 <= nbytes) {
                        v = (uint32_t)buf[q] << 16 | (uint32_t)buf[q + 1] << 8 | buf[q + 2];
                    } else {  /* the last bytes: what lies past the end reads as zeros */
                        v = 0;
                        for (int k = 0; k < 3; k++)
                            v = v << 8 | (q + k < nbytes ? buf[q + k] : 0);
                    }
                    uint16_t e = table[(v >> (24 - MAX_BITS - (p[j] & 7))) & ((1u << MAX_BITS) - 1)];
                    if (!(e >> 8)) {
                        bad = g + j;
                        break;
                    }
                    o[(g + j) * per + i] = (uint8_t)e;
                    p[j] += e >> 8;
                }
            }
            for (int j = 0; j < width && bad < 0; j++)
                if (p[j] != ends[g + j])
                    bad = g + j;
        }
        Py_END_ALLOW_THREADS
        result = PyLong_FromSsize_t(bad);
    }
done:
    PyBuffer_Release(&s);
    PyBuffer_Release(&st);
    PyBuffer_Release(&en);
    PyBuffer_Release(&tb);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef hufc_methods[] = {
    {"decode", hufc_decode, METH_VARARGS,
     "decode(stream, starts, ends, per, table, out) -> -1 or the first malformed lane"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef hufc_module = {
    PyModuleDef_HEAD_INIT, "_hufc", "The HUF plane decoder's inner loop, compiled.", -1,
    hufc_methods,
};

PyMODINIT_FUNC
PyInit__hufc(void)
{
    return PyModule_Create(&hufc_module);
}
