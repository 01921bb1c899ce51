/* iwsproxy._speedups: the codec's per-frame loops in C.
 *
 * Optional: setup.py builds it when a compiler is present, and iwsproxy.codec_c
 * falls back to the pure-Python code of iwsproxy.frames when it is absent. Each
 * function does exactly what the Python code it stands in for does on the inputs
 * it accepts (tests/unit/test_speedups.py checks that with hypothesis), and leaves
 * every frame it does not handle, and every error, to the Python code.
 *
 *   scan_frames(src, pos, mask_bit, max_len, events, controls) -> int
 *       Consume, from src[pos:], whole frames with the mask bit equal to mask_bit (0 or
 *       0x80) and no RSV bit that are: unfragmented TEXT/BINARY frames with a 7- or 16-bit
 *       length of at most max_len bytes, appended as (opcode, payload) to the list events
 *       (payload unmasked, text checked as UTF-8); or PING/PONG frames, appended to the
 *       list controls (to events if controls is None). Returns the position of the first
 *       frame it did not consume: len(src), an incomplete frame, any other frame (CLOSE,
 *       a fragment, a length over max_len...), or a text frame that is not valid UTF-8;
 *       the caller's general path decides what to do with it. For the moment no
 *       fragmented message may be open (a lone TEXT/BINARY frame would break it).
 *
 *   encode_data_frames(messages, mask_bit, keys, ping) -> bytes
 *       The frames of whole TEXT/BINARY messages, then a Ping with payload ping (or
 *       None); masked with the 4-byte keys in keys (one per frame) when mask_bit is 0x80.
 *       Raises ValueError for an opcode other than TEXT/BINARY or a ping over 125 bytes.
 *
 *   payload_bytes(messages) -> int
 *       The sum of len(payload) over the (opcode, payload) pairs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static PyObject *opcode_objs[11]; /* TEXT, BINARY, PING and PONG as ints (small ints: immortal enough) */

static void
xor_mask(unsigned char *dst, const unsigned char *src, Py_ssize_t n, const unsigned char *key)
{
    uint32_t k32;
    uint64_t k64, v;
    Py_ssize_t i = 0;
    memcpy(&k32, key, 4);
    k64 = ((uint64_t)k32 << 32) | k32;
    for (; i + 8 <= n; i += 8) {
        memcpy(&v, src + i, 8);
        v ^= k64;
        memcpy(dst + i, &v, 8);
    }
    for (; i < n; i++) {
        dst[i] = src[i] ^ key[i & 3];
    }
}

/* 1 if s[0:n] is valid UTF-8 as Python's strict decoder sees it (no surrogates, no
 * overlong forms, nothing past U+10FFFF), else 0. */
static int
utf8_valid(const unsigned char *s, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    while (i < n) {
        if (i + 8 <= n) {
            uint64_t v;
            memcpy(&v, s + i, 8);
            if (!(v & 0x8080808080808080ULL)) {
                i += 8;
                continue;
            }
        }
        unsigned char c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        if (c < 0xC2) {
            return 0;
        }
        if (c < 0xE0) {
            if (i + 1 >= n || (s[i + 1] & 0xC0) != 0x80) {
                return 0;
            }
            i += 2;
            continue;
        }
        if (c < 0xF0) {
            if (i + 2 >= n) {
                return 0;
            }
            unsigned char c1 = s[i + 1];
            if (c == 0xE0) {
                if (c1 < 0xA0 || c1 > 0xBF) return 0;
            }
            else if (c == 0xED) {
                if (c1 < 0x80 || c1 > 0x9F) return 0;
            }
            else if ((c1 & 0xC0) != 0x80) {
                return 0;
            }
            if ((s[i + 2] & 0xC0) != 0x80) {
                return 0;
            }
            i += 3;
            continue;
        }
        if (c < 0xF5) {
            if (i + 3 >= n) {
                return 0;
            }
            unsigned char c1 = s[i + 1];
            if (c == 0xF0) {
                if (c1 < 0x90 || c1 > 0xBF) return 0;
            }
            else if (c == 0xF4) {
                if (c1 < 0x80 || c1 > 0x8F) return 0;
            }
            else if ((c1 & 0xC0) != 0x80) {
                return 0;
            }
            if ((s[i + 2] & 0xC0) != 0x80 || (s[i + 3] & 0xC0) != 0x80) {
                return 0;
            }
            i += 4;
            continue;
        }
        return 0;
    }
    return 1;
}

static PyObject *
scan_frames(PyObject *self, PyObject *args)
{
    PyObject *src, *events, *controls;
    Py_ssize_t pos, max_len;
    int mask_bit;
    Py_buffer view;

    if (!PyArg_ParseTuple(args, "OninO!O", &src, &pos, &mask_bit, &max_len, &PyList_Type, &events, &controls)) {
        return NULL;
    }
    if (controls == Py_None) {
        controls = events;
    }
    else if (!PyList_Check(controls)) {
        PyErr_SetString(PyExc_TypeError, "controls must be a list or None");
        return NULL;
    }
    if (PyObject_GetBuffer(src, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    const unsigned char *s = (const unsigned char *)view.buf;
    Py_ssize_t end = view.len;
    if (pos < 0) {
        pos = 0;
    }
    while (end - pos >= 2) {
        unsigned char b0 = s[pos], b1 = s[pos + 1];
        Py_ssize_t length, head;
        PyObject *into = events;
        if ((b1 & 0x80) != mask_bit) {
            break;
        }
        length = b1 & 0x7F;
        head = 2;
        if (b0 == 0x89 || b0 == 0x8A) {
            if (length > 125) {
                break;
            }
            into = controls;
        }
        else if (b0 != 0x81 && b0 != 0x82) {
            break;
        }
        else if (length == 126) {
            if (end - pos < 4) {
                break;
            }
            length = ((Py_ssize_t)s[pos + 2] << 8) | s[pos + 3];
            head = 4;
        }
        else if (length == 127) {
            break;
        }
        if (length > max_len && into == events) {
            break;
        }
        if (mask_bit) {
            head += 4;
        }
        if (end - pos - head < length) {
            break;
        }
        PyObject *payload = PyBytes_FromStringAndSize(NULL, length);
        if (payload == NULL) {
            goto error;
        }
        unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(payload);
        if (mask_bit) {
            xor_mask(dst, s + pos + head, length, s + pos + head - 4);
        }
        else {
            memcpy(dst, s + pos + head, length);
        }
        if (b0 == 0x81 && !utf8_valid(dst, length)) {
            Py_DECREF(payload);
            break;
        }
        PyObject *event = PyTuple_New(2);
        if (event == NULL) {
            Py_DECREF(payload);
            goto error;
        }
        PyObject *op = opcode_objs[b0 & 0x0F];  /* 1, 2, 9 or 10 */
        Py_INCREF(op);
        PyTuple_SET_ITEM(event, 0, op);
        PyTuple_SET_ITEM(event, 1, payload);
        int failed = PyList_Append(into, event);
        Py_DECREF(event);
        if (failed) {
            goto error;
        }
        pos += head + length;
    }
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(pos);
error:
    PyBuffer_Release(&view);
    return NULL;
}

/* The opcode and payload of one message; a new buffer view in *payload (release it). */
static int
unpack_message(PyObject *message, long *opcode, Py_buffer *payload)
{
    PyObject *op_obj, *data;
    int result = -1;
    if (PyTuple_CheckExact(message) && PyTuple_GET_SIZE(message) == 2) {
        op_obj = PyTuple_GET_ITEM(message, 0);
        data = PyTuple_GET_ITEM(message, 1);
        Py_INCREF(op_obj);
        Py_INCREF(data);
    }
    else {
        op_obj = PySequence_GetItem(message, 0);
        data = op_obj == NULL ? NULL : PySequence_GetItem(message, 1);
        if (data == NULL) {
            Py_XDECREF(op_obj);
            return -1;
        }
    }
    *opcode = PyLong_AsLong(op_obj);
    if (*opcode == -1 && PyErr_Occurred()) {
        goto done;
    }
    if (*opcode != 1 && *opcode != 2) {
        PyErr_Format(PyExc_ValueError, "not a data opcode: %#lx", *opcode);
        goto done;
    }
    result = PyObject_GetBuffer(data, payload, PyBUF_SIMPLE);
done:
    Py_DECREF(op_obj);
    Py_DECREF(data);
    return result;
}

static unsigned char *
write_header(unsigned char *out, unsigned char b0, int mask_bit, Py_ssize_t n)
{
    *out++ = b0;
    if (n < 126) {
        *out++ = (unsigned char)(mask_bit | n);
    }
    else if (n < 0x10000) {
        *out++ = (unsigned char)(mask_bit | 126);
        *out++ = (unsigned char)(n >> 8);
        *out++ = (unsigned char)n;
    }
    else {
        *out++ = (unsigned char)(mask_bit | 127);
        for (int shift = 56; shift >= 0; shift -= 8) {
            *out++ = (unsigned char)((uint64_t)n >> shift);
        }
    }
    return out;
}

static Py_ssize_t
header_size(Py_ssize_t n, int mask_bit)
{
    return (n < 126 ? 2 : n < 0x10000 ? 4 : 10) + (mask_bit ? 4 : 0);
}

static PyObject *
encode_data_frames(PyObject *self, PyObject *args)
{
    PyObject *messages, *keys_obj, *ping_obj;
    int mask_bit;
    Py_buffer ping = {0};
    const char *keys = NULL;
    Py_ssize_t keys_len = 0, total = 0, count, i;
    PyObject *result = NULL;

    if (!PyArg_ParseTuple(args, "O!iOO", &PyList_Type, &messages, &mask_bit, &keys_obj, &ping_obj)) {
        return NULL;
    }
    if (mask_bit && (!PyBytes_Check(keys_obj))) {
        PyErr_SetString(PyExc_TypeError, "keys must be bytes");
        return NULL;
    }
    if (mask_bit) {
        keys = PyBytes_AS_STRING(keys_obj);
        keys_len = PyBytes_GET_SIZE(keys_obj);
    }
    if (ping_obj != Py_None) {
        if (PyObject_GetBuffer(ping_obj, &ping, PyBUF_SIMPLE) < 0) {
            return NULL;
        }
        if (ping.len > 125) {
            PyBuffer_Release(&ping);
            PyErr_SetString(PyExc_ValueError, "control frames carry at most 125 bytes and are never fragmented");
            return NULL;
        }
        total += 2 + (mask_bit ? 4 : 0) + ping.len;
    }
    count = PyList_GET_SIZE(messages);
    if (mask_bit && keys_len < 4 * (count + (ping_obj != Py_None))) {
        PyErr_SetString(PyExc_ValueError, "not enough mask keys");
        goto done;
    }
    for (i = 0; i < count; i++) {
        long opcode;
        Py_buffer payload;
        if (unpack_message(PyList_GET_ITEM(messages, i), &opcode, &payload) < 0) {
            goto done;
        }
        total += header_size(payload.len, mask_bit) + payload.len;
        PyBuffer_Release(&payload);
    }
    result = PyBytes_FromStringAndSize(NULL, total);
    if (result == NULL) {
        goto done;
    }
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
    unsigned char *stop = out + total;
    for (i = 0; i < count; i++) {
        long opcode;
        Py_buffer payload;
        /* a payload's __buffer__ could have changed the list: check again */
        if (i >= PyList_GET_SIZE(messages) || unpack_message(PyList_GET_ITEM(messages, i), &opcode, &payload) < 0) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_RuntimeError, "messages changed while encoding");
            }
            Py_CLEAR(result);
            goto done;
        }
        if (out + header_size(payload.len, mask_bit) + payload.len > stop) {
            PyBuffer_Release(&payload);
            PyErr_SetString(PyExc_RuntimeError, "messages changed while encoding");
            Py_CLEAR(result);
            goto done;
        }
        out = write_header(out, (unsigned char)(0x80 | opcode), mask_bit, payload.len);
        if (mask_bit) {
            memcpy(out, keys + 4 * i, 4);
            out += 4;
            xor_mask(out, payload.buf, payload.len, (const unsigned char *)keys + 4 * i);
        }
        else {
            memcpy(out, payload.buf, payload.len);
        }
        out += payload.len;
        PyBuffer_Release(&payload);
    }
    if (ping_obj != Py_None) {
        if (out + 2 + (mask_bit ? 4 : 0) + ping.len != stop) {
            PyErr_SetString(PyExc_RuntimeError, "messages changed while encoding");
            Py_CLEAR(result);
            goto done;
        }
        out = write_header(out, 0x89, mask_bit, ping.len);
        if (mask_bit) {
            memcpy(out, keys + 4 * count, 4);
            out += 4;
            xor_mask(out, ping.buf, ping.len, (const unsigned char *)keys + 4 * count);
        }
        else {
            memcpy(out, ping.buf, ping.len);
        }
        out += ping.len;
    }
    if (out != stop) {
        PyErr_SetString(PyExc_RuntimeError, "messages changed while encoding");
        Py_CLEAR(result);
    }
done:
    if (ping_obj != Py_None) {
        PyBuffer_Release(&ping);
    }
    return result;
}

static PyObject *
payload_bytes(PyObject *self, PyObject *iterable)
{
    PyObject *messages = PySequence_Fast(iterable, "messages must be iterable");
    if (messages == NULL) {
        return NULL;
    }
    Py_ssize_t total = 0;
    /* the size is read at every step: a message's __getitem__ could change the list */
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(messages); i++) {
        PyObject *message = PySequence_Fast_GET_ITEM(messages, i);
        Py_ssize_t n;
        if (PyTuple_CheckExact(message) && PyTuple_GET_SIZE(message) == 2
                && PyBytes_CheckExact(PyTuple_GET_ITEM(message, 1))) {
            n = PyBytes_GET_SIZE(PyTuple_GET_ITEM(message, 1));
        }
        else {
            Py_INCREF(message);
            PyObject *payload = PySequence_GetItem(message, 1);
            Py_DECREF(message);
            if (payload == NULL) {
                Py_DECREF(messages);
                return NULL;
            }
            n = PyObject_Length(payload);
            Py_DECREF(payload);
            if (n < 0) {
                Py_DECREF(messages);
                return NULL;
            }
        }
        total += n;
    }
    Py_DECREF(messages);
    return PyLong_FromSsize_t(total);
}

static PyMethodDef methods[] = {
    {"scan_frames", scan_frames, METH_VARARGS, "Consume whole data, ping and pong frames (see the module)."},
    {"encode_data_frames", encode_data_frames, METH_VARARGS, "Encode whole data messages and a Ping."},
    {"payload_bytes", payload_bytes, METH_O, "The payload bytes of (opcode, payload) messages."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "iwsproxy._speedups", "The codec's per-frame loops in C.", -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    for (int op = 0; op < 11; op++) {
        opcode_objs[op] = PyLong_FromLong(op);
        if (opcode_objs[op] == NULL) {
            return NULL;
        }
    }
    return PyModule_Create(&module);
}
