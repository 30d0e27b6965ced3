/* Compiled kernels of vampd (optional: vampd/imaging.py falls back to numpy without them).
 *
 * lanczos_shift: the separable 8-tap resampling of vampd.imaging.shift_window, done row by row
 * in L1 cache straight from the frames (no padded copy, no banded-matrix overhead). It computes
 * exactly what the numpy path computes (docs/design.md, "Alignment kernel"):
 *
 *   out[f, y, x] = sum_t wx[f, t] * sum_s wy[f, s] * src_f(r0[f] + y + s, c0[f] + x + t)
 *
 * where src_f is frame index[f] extended beyond its edges by edge replication and with NaN read
 * as 0. Marking the outputs whose nearest source pixel is NaN or outside the frame stays in
 * Python; the kernel returns, per frame, whether it read a NaN.
 *
 * Only the CPython buffer protocol is used (no numpy headers at build time). On x86-64 the kernel
 * is compiled twice (AVX2+FMA and baseline) and the one the CPU runs is picked at run time.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NTAP 8

/* inlined into a function that also releases the GIL, GCC 12 does not vectorise a loop */
#if defined(__GNUC__)
#define VAMPD_NOINLINE __attribute__((noinline))
#else
#define VAMPD_NOINLINE
#endif

typedef struct {
    const char *base;
    Py_ssize_t s0, s1, s2; /* byte strides */
    Py_ssize_t n0, n1, n2;
} view3;

static inline Py_ssize_t clampi(Py_ssize_t v, Py_ssize_t lo, Py_ssize_t hi)
{
    return v < lo ? lo : (v > hi ? hi : v);
}

static inline float nan0(float v) { return v == v ? v : 0.0f; }

static inline uint16_t load_u16(const char *p, int swap, uint16_t xm)
{
    uint16_t v = *(const uint16_t *)p;
    return (uint16_t)((swap ? (uint16_t)((v >> 8) | (v << 8)) : v) ^ xm);
}

/* The body of one output frame, compiled once per instruction set (SHIFT_FRAME below).
 * Vertical pass: tmp[x] = sum_s a[s] * row_s[c0 + x] for x < w + 7 (columns clamped to the frame
 * = edge replication); the fast loop sums without looking for NaN and the row is redone with NaN
 * read as 0 only if its sum came out NaN (NaN are rare: saturation, an unusable flat).
 * Horizontal pass: out[y, x] = sum_t b[t] * tmp[x + t]. tmp holds w + 7 floats. */
#define SHIFT_FRAME_BODY                                                                                    \
    const Py_ssize_t ny = fr->n1, nx = fr->n2, wt = w + NTAP - 1;                                        \
    const char *fbase = fr->base + src * fr->s0;                                                         \
    const Py_ssize_t xlo = clampi(-c0, 0, wt), xhi = clampi(nx - c0, xlo, wt);                           \
    int nan_seen = 0;                                                                                    \
    for (Py_ssize_t y = 0; y < h; y++) {                                                                 \
        const char *rows[NTAP];                                                                          \
        for (int s = 0; s < NTAP; s++)                                                                   \
            rows[s] = fbase + clampi(r0 + y + s, 0, ny - 1) * fr->s1;                                    \
        int row_nan = 0, contiguous = fr->s2 == (Py_ssize_t)sizeof(float);                              \
        /* the interior columns [xlo, xhi): pointers at its first source column (inside the row) */ \
        const Py_ssize_t ni = xhi - xlo, first = ni > 0 ? c0 + xlo : 0;                                  \
        const float *p0 = (const float *)rows[0] + first, *p1 = (const float *)rows[1] + first;          \
        const float *p2 = (const float *)rows[2] + first, *p3 = (const float *)rows[3] + first;          \
        const float *p4 = (const float *)rows[4] + first, *p5 = (const float *)rows[5] + first;          \
        const float *p6 = (const float *)rows[6] + first, *p7 = (const float *)rows[7] + first;          \
        float *ti = tmp + xlo;                                                                           \
        if (contiguous) {                                                                                \
            for (Py_ssize_t i = 0; i < ni; i++)                                                          \
                ti[i] = a[0] * p0[i] + a[1] * p1[i] + a[2] * p2[i] + a[3] * p3[i] + a[4] * p4[i] +       \
                        a[5] * p5[i] + a[6] * p6[i] + a[7] * p7[i];                                      \
            for (Py_ssize_t i = 0; i < ni; i++)                                                          \
                row_nan |= ti[i] != ti[i];                                                               \
        }                                                                                                \
        if (row_nan) { /* a NaN was read (or made from infinities): again, with NaN read as 0 */        \
            int nn = 0;                                                                                  \
            for (Py_ssize_t i = 0; i < ni; i++) {                                                        \
                nn |= (p0[i] != p0[i]) | (p1[i] != p1[i]) | (p2[i] != p2[i]) | (p3[i] != p3[i]) |        \
                      (p4[i] != p4[i]) | (p5[i] != p5[i]) | (p6[i] != p6[i]) | (p7[i] != p7[i]);         \
                ti[i] = a[0] * nan0(p0[i]) + a[1] * nan0(p1[i]) + a[2] * nan0(p2[i]) +                   \
                        a[3] * nan0(p3[i]) + a[4] * nan0(p4[i]) + a[5] * nan0(p5[i]) +                   \
                        a[6] * nan0(p6[i]) + a[7] * nan0(p7[i]);                                         \
            }                                                                                            \
            nan_seen |= nn;                                                                              \
        } else if (!contiguous) { /* strided frames */                                                   \
            for (Py_ssize_t x = xlo; x < xhi; x++) {                                                     \
                float acc = 0.0f;                                                                        \
                for (int s = 0; s < NTAP; s++) {                                                         \
                    float v = *(const float *)(rows[s] + (c0 + x) * fr->s2);                             \
                    nan_seen |= v != v;                                                                  \
                    acc += a[s] * nan0(v);                                                               \
                }                                                                                        \
                tmp[x] = acc;                                                                            \
            }                                                                                            \
        }                                                                                                \
        if (xlo > 0 || xhi < wt) { /* window beyond the left / right edge: replicated edge columns */   \
            float el = 0.0f, er = 0.0f;                                                                  \
            for (int s = 0; s < NTAP; s++) {                                                             \
                float vl = *(const float *)rows[s], vr = *(const float *)(rows[s] + (nx - 1) * fr->s2);  \
                nan_seen |= (xlo > 0 && vl != vl) || (xhi < wt && vr != vr);                             \
                el += a[s] * nan0(vl);                                                                   \
                er += a[s] * nan0(vr);                                                                   \
            }                                                                                            \
            for (Py_ssize_t x = 0; x < xlo; x++)                                                         \
                tmp[x] = el;                                                                             \
            for (Py_ssize_t x = xhi; x < wt; x++)                                                        \
                tmp[x] = er;                                                                             \
        }                                                                                                \
        char *orow = obase + y * os1;                                                                    \
        if (os2 == (Py_ssize_t)sizeof(float)) {                                                          \
            float *o = (float *)orow;                                                                    \
            for (Py_ssize_t x = 0; x < w; x++) {                                                         \
                const float *t = tmp + x;                                                                \
                o[x] = b[0] * t[0] + b[1] * t[1] + b[2] * t[2] + b[3] * t[3] + b[4] * t[4] +             \
                       b[5] * t[5] + b[6] * t[6] + b[7] * t[7];                                          \
            }                                                                                            \
        } else {                                                                                         \
            for (Py_ssize_t x = 0; x < w; x++) {                                                         \
                const float *t = tmp + x;                                                                \
                *(float *)(orow + x * os2) = b[0] * t[0] + b[1] * t[1] + b[2] * t[2] + b[3] * t[3] +     \
                                             b[4] * t[4] + b[5] * t[5] + b[6] * t[6] + b[7] * t[7];      \
            }                                                                                            \
        }                                                                                                \
    }                                                                                                    \
    return nan_seen;

#define SHIFT_FRAME_ARGS                                                                                  \
    const view3 *fr, Py_ssize_t src, Py_ssize_t r0, Py_ssize_t c0, const float *restrict a,              \
        const float *restrict b, char *obase, Py_ssize_t os1, Py_ssize_t os2, Py_ssize_t h, Py_ssize_t w, \
        float *restrict tmp

typedef int (*shift_frame_fn)(SHIFT_FRAME_ARGS);

static int shift_frame_base(SHIFT_FRAME_ARGS) { SHIFT_FRAME_BODY }

#if defined(__GNUC__) && defined(__x86_64__)
/* the same code for AVX2 + FMA (8 floats per instruction), chosen at run time */
__attribute__((target("avx2,fma"))) static int shift_frame_avx2(SHIFT_FRAME_ARGS) { SHIFT_FRAME_BODY }

static shift_frame_fn pick_shift_frame(void)
{
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return shift_frame_avx2;
    return shift_frame_base;
}
#else
static shift_frame_fn pick_shift_frame(void) { return shift_frame_base; }
#endif

/* The buffers one call holds: released together, however far the call got. */
typedef struct {
    const char *fn; /* the Python-level name, for error messages */
    Py_buffer b[8];
    int n;
} held_t;

static void release_all(held_t *h)
{
    while (h->n > 0)
        PyBuffer_Release(&h->b[--h->n]);
}

/* numpy exports int64 as "l" on LP64 platforms, "q" elsewhere */
#define I64_FORMATS (sizeof(long) == 8 ? "ql" : "q")

/* The item format without its byte-order prefix; *swap when the declared order is not the host's. */
static const char *bare_format(const char *f, int *swap)
{
    const uint16_t one = 1;
    const char host = *(const char *)&one ? '<' : '>';
    if (f == NULL)
        return "B";
    if (swap != NULL)
        *swap = (f[0] == '<' || f[0] == '>' || f[0] == '!') && (f[0] == '<' ? '<' : '>') != host;
    return (f[0] != '\0' && strchr("<>!=@", f[0]) != NULL) ? f + 1 : f;
}

/* An ndim-D array (any strides) of item "fmt" (itemsize bytes), held by h; NULL with an exception. */
static Py_buffer *take_array(held_t *h, PyObject *obj, int writable, int ndim, const char *fmt, Py_ssize_t itemsize,
                             const char *what, int *swap)
{
    Py_buffer *buf = &h->b[h->n];
    if (PyObject_GetBuffer(obj, buf, PyBUF_RECORDS_RO | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return NULL;
    h->n++;
    if (buf->ndim != ndim || buf->itemsize != itemsize || strcmp(bare_format(buf->format, swap), fmt) != 0) {
        PyErr_Format(PyExc_TypeError, "%s: %s must be a %d-D %s array", h->fn, what, ndim,
                     fmt[0] == 'f' ? "float32" : "uint16");
        return NULL;
    }
    return buf;
}

static Py_buffer *take_f32(held_t *h, PyObject *obj, int writable, int ndim, const char *what)
{
    return take_array(h, obj, writable, ndim, "f", 4, what, NULL);
}

/* A C-contiguous vector of nbytes bytes whose item type is one of the format characters in fmts. */
static Py_buffer *take_vector(held_t *h, PyObject *obj, Py_ssize_t nbytes, const char *fmts, const char *what)
{
    Py_buffer *buf = &h->b[h->n];
    if (PyObject_GetBuffer(obj, buf, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return NULL;
    h->n++;
    const char *f = bare_format(buf->format, NULL);
    if (buf->len != nbytes || strlen(f) != 1 || strchr(fmts, f[0]) == NULL) {
        PyErr_Format(PyExc_TypeError, "%s: %s: wrong size or type", h->fn, what);
        return NULL;
    }
    return buf;
}

static PyObject *none_result(void)
{
    Py_INCREF(Py_None);
    return Py_None;
}

PyDoc_STRVAR(lanczos_shift_doc,
             "lanczos_shift(frames, index, r0, c0, wy, wx, out) -> bytes\n\n"
             "Separable 8-tap resampling of windows of float32 ``frames`` (N, ny, nx) into ``out``\n"
             "(n, h, w); ``index``, ``r0``, ``c0`` int64 (n,), ``wy``, ``wx`` float32 (n, 8), C-contiguous.\n"
             "Returns one byte per output frame: 1 if a NaN was read.");

static PyObject *lanczos_shift(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *ofr, *oidx, *or0, *oc0, *owy, *owx, *oout, *result = NULL;
    if (!PyArg_ParseTuple(args, "OOOOOOO", &ofr, &oidx, &or0, &oc0, &owy, &owx, &oout))
        return NULL;
    held_t h = {"lanczos_shift", {{0}}, 0};
    Py_buffer *fb, *ob, *ib, *rb, *cb, *yb, *xb;
    float *tmp = NULL;
    if (!(fb = take_f32(&h, ofr, 0, 3, "frames")) || !(ob = take_f32(&h, oout, 1, 3, "out")))
        goto done;
    Py_ssize_t n = ob->shape[0], h_out = ob->shape[1], w = ob->shape[2];
    if (!(ib = take_vector(&h, oidx, n * 8, I64_FORMATS, "index")) ||
        !(rb = take_vector(&h, or0, n * 8, I64_FORMATS, "r0")) || !(cb = take_vector(&h, oc0, n * 8, I64_FORMATS, "c0")) ||
        !(yb = take_vector(&h, owy, n * NTAP * 4, "f", "wy")) || !(xb = take_vector(&h, owx, n * NTAP * 4, "f", "wx")))
        goto done;
    view3 fr = {fb->buf, fb->strides[0], fb->strides[1], fb->strides[2], fb->shape[0], fb->shape[1], fb->shape[2]};
    const int64_t *idx = ib->buf, *r0 = rb->buf, *c0 = cb->buf;
    const float *wy = yb->buf, *wx = xb->buf;
    int bad_index = fr.n1 < 1 || fr.n2 < 1;
    for (Py_ssize_t f = 0; f < n; f++)
        bad_index |= idx[f] < 0 || idx[f] >= fr.n0;
    if (bad_index) {
        PyErr_SetString(PyExc_IndexError, "lanczos_shift: frame index out of range or empty frames");
        goto done;
    }
    tmp = malloc(sizeof(float) * (size_t)(w + NTAP));
    if (tmp == NULL || (result = PyBytes_FromStringAndSize(NULL, n)) == NULL) {
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        goto done;
    }
    char *flags = PyBytes_AS_STRING(result);
    shift_frame_fn shift_frame = pick_shift_frame();
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t f = 0; f < n; f++)
        flags[f] = (char)shift_frame(&fr, idx[f], r0[f], c0[f], wy + NTAP * f, wx + NTAP * f,
                                     (char *)ob->buf + f * ob->strides[0], ob->strides[1], ob->strides[2], h_out, w,
                                     tmp);
    Py_END_ALLOW_THREADS
done:
    free(tmp);
    release_all(&h);
    return result;
}

PyDoc_STRVAR(abs_moments_doc,
             "abs_moments(frames, index, y0, x0, s1, s2) -> None\n\n"
             "With h = |d| + d of the window of float32 ``frames`` (N, ny, nx) at (y0, x0) the shape of\n"
             "``s1``: s1 = sum of h, s2 = sum of h * h over the frames ``index`` (int64, C-contiguous),\n"
             "summed in float32 in the order given (as numpy would); NaN propagates.");

/* The two sums of vampd.stages.calerror.FrameVariance.group_sum in one pass per frame, over row
 * bands small enough for s1 and s2 to stay in cache. */
static PyObject *abs_moments(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *ofr, *oidx, *os1, *os2, *result = NULL;
    Py_ssize_t y0, x0;
    if (!PyArg_ParseTuple(args, "OOnnOO", &ofr, &oidx, &y0, &x0, &os1, &os2))
        return NULL;
    held_t hd = {"abs_moments", {{0}}, 0};
    Py_buffer *fb, *ab, *bb, *ib;
    Py_ssize_t n = PyObject_Length(oidx);
    if (n < 0 || !(fb = take_f32(&hd, ofr, 0, 3, "frames")) || !(ab = take_f32(&hd, os1, 1, 2, "s1")) ||
        !(bb = take_f32(&hd, os2, 1, 2, "s2")) || !(ib = take_vector(&hd, oidx, n * 8, I64_FORMATS, "index")))
        goto done;
    Py_ssize_t h = ab->shape[0], w = ab->shape[1];
    const int64_t *idx = ib->buf;
    int ok = n >= 1 && bb->shape[0] == h && bb->shape[1] == w && y0 >= 0 && x0 >= 0 && y0 + h <= fb->shape[1] &&
             x0 + w <= fb->shape[2] && ab->strides[1] == 4 && bb->strides[1] == 4 && fb->strides[2] == 4;
    for (Py_ssize_t f = 0; f < n; f++)
        ok &= idx[f] >= 0 && idx[f] < fb->shape[0];
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "abs_moments: window, index or strides out of range");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t band = w > 0 ? (8192 + w - 1) / w : 1;
    for (Py_ssize_t ya = 0; ya < h; ya += band) {
        Py_ssize_t yb = ya + band < h ? ya + band : h;
        for (Py_ssize_t i = 0; i < n; i++) {
            const char *fr = (const char *)fb->buf + idx[i] * fb->strides[0];
            for (Py_ssize_t y = ya; y < yb; y++) {
                const float *d = (const float *)(fr + (y0 + y) * fb->strides[1]) + x0;
                float *p = (float *)((char *)ab->buf + y * ab->strides[0]);
                float *q = (float *)((char *)bb->buf + y * bb->strides[0]);
                if (i == 0) {
                    for (Py_ssize_t x = 0; x < w; x++) {
                        float v = fabsf(d[x]) + d[x];
                        p[x] = v;
                        q[x] = v * v;
                    }
                } else {
                    for (Py_ssize_t x = 0; x < w; x++) {
                        float v = fabsf(d[x]) + d[x];
                        p[x] += v;
                        q[x] += v * v;
                    }
                }
            }
        }
    }
    Py_END_ALLOW_THREADS
    result = none_result();
done:
    release_all(&hd);
    return result;
}

/* One contiguous row of calibrate_u16: d = (float(r ^ xm) - b) * g; returns the row's max of
 * r ^ xm. Separate functions, so that the compiler vectorises them. */
static uint16_t cal_row(const uint16_t *restrict r, const float *restrict b, const float *restrict g,
                        float *restrict d, Py_ssize_t nx, uint16_t xm)
{
    uint16_t mx = 0;
    for (Py_ssize_t x = 0; x < nx; x++) {
        uint16_t v = (uint16_t)(r[x] ^ xm);
        d[x] = ((float)v - b[x]) * g[x];
        mx = v > mx ? v : mx;
    }
    return mx;
}

/* the same for byte-swapped input (a big-endian view of the mapped FITS file) */
static uint16_t cal_row_swapped(const uint16_t *restrict r, const float *restrict b, const float *restrict g,
                                float *restrict d, Py_ssize_t nx, uint16_t xm)
{
    uint16_t mx = 0;
    for (Py_ssize_t x = 0; x < nx; x++) {
        uint16_t v = (uint16_t)((uint16_t)((r[x] >> 8) | (r[x] << 8)) ^ xm);
        d[x] = ((float)v - b[x]) * g[x];
        mx = v > mx ? v : mx;
    }
    return mx;
}

PyDoc_STRVAR(calibrate_u16_doc,
             "calibrate_u16(raw, xor, back, gain, satlevel, data, nsat) -> None\n\n"
             "With v = raw ^ xor (raw uint16 in either byte order, e.g. a big-endian view of the mapped\n"
             "file): data = (float32(v) - back) * gain in float32, NaN where v >= satlevel (counted per\n"
             "frame into the int64 vector ``nsat`` unless it is None). ``raw`` uint16 (n, ny, nx),\n"
             "``back``/``gain`` float32 (ny, nx) (any strides, zero for a constant), ``data`` float32\n"
             "(n, ny, nx).");

/* The data part of vampd.stages.calibrate._calibrate_blocks in one pass: the same float32
 * operations in the same order (bit-identical), with the saturation test folded in. */
static PyObject *calibrate_u16(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *oraw, *oback, *ogain, *odata, *onsat, *result = NULL;
    double sat;
    unsigned int xor_mask;
    if (!PyArg_ParseTuple(args, "OIOOdOO", &oraw, &xor_mask, &oback, &ogain, &sat, &odata, &onsat))
        return NULL;
    held_t h = {"calibrate_u16", {{0}}, 0};
    Py_buffer *rb, *bb, *gb, *db, *nb = NULL;
    int swap = 0;
    if (!(rb = take_array(&h, oraw, 0, 3, "H", 2, "raw", &swap)) || !(bb = take_f32(&h, oback, 0, 2, "back")) ||
        !(gb = take_f32(&h, ogain, 0, 2, "gain")) || !(db = take_f32(&h, odata, 1, 3, "data")) ||
        (onsat != Py_None && !(nb = take_vector(&h, onsat, rb->shape[0] * 8, I64_FORMATS, "nsat"))))
        goto done;
    Py_ssize_t n = rb->shape[0], ny = rb->shape[1], nx = rb->shape[2];
    if (db->shape[0] != n || db->shape[1] != ny || db->shape[2] != nx || bb->shape[0] != ny || bb->shape[1] != nx ||
        gb->shape[0] != ny || gb->shape[1] != nx) {
        PyErr_SetString(PyExc_ValueError, "calibrate_u16: shapes differ");
        goto done;
    }
    int64_t *nsat = nb != NULL ? (int64_t *)nb->buf : NULL;
    const uint16_t xm = (uint16_t)xor_mask;
    const int fast = rb->strides[2] == 2 && bb->strides[1] == 4 && gb->strides[1] == 4 && db->strides[2] == 4;
    Py_BEGIN_ALLOW_THREADS
    /* rows outside, frames inside: a row of the constants is read from memory once per chunk, not
     * once per frame (at 536² they are 2.3 MB, past the L2 cache) */
    for (Py_ssize_t y = 0; y < ny; y++) {
        const char *b = (const char *)bb->buf + y * bb->strides[0];
        const char *g = (const char *)gb->buf + y * gb->strides[0];
        for (Py_ssize_t f = 0; f < n; f++) {
            const char *r = (const char *)rb->buf + f * rb->strides[0] + y * rb->strides[1];
            float *d = (float *)((char *)db->buf + f * db->strides[0] + y * db->strides[1]);
            uint16_t mx = 0; /* saturation is rare: a row's max decides whether to look */
            if (fast) {
                mx = (swap ? cal_row_swapped : cal_row)((const uint16_t *)r, (const float *)b, (const float *)g, d,
                                                          nx, xm);
            } else {
                for (Py_ssize_t x = 0; x < nx; x++) {
                    uint16_t v = load_u16(r + x * rb->strides[2], swap, xm);
                    float bv = *(const float *)(b + x * bb->strides[1]);
                    float gv = *(const float *)(g + x * gb->strides[1]);
                    *(float *)((char *)d + x * db->strides[2]) = ((float)v - bv) * gv;
                    mx = v > mx ? v : mx;
                }
            }
            if ((double)mx >= sat) {
                int64_t cnt = 0;
                for (Py_ssize_t x = 0; x < nx; x++) {
                    if ((double)load_u16(r + x * rb->strides[2], swap, xm) >= sat) {
                        *(float *)((char *)d + x * db->strides[2]) = NAN;
                        cnt++;
                    }
                }
                if (nsat != NULL)
                    nsat[f] += cnt;
            }
        }
    }
    Py_END_ALLOW_THREADS
    result = none_result();
done:
    release_all(&h);
    return result;
}

/* One row of error_model: e = sqrt(h (c1 + c2 h) + var_c), h = |d| + d, the float32 operations of
 * vampd.stages.calibrate.error_from_values in its order (c2 == NULL: h c1 + var_c). */
VAMPD_NOINLINE static void error_row(const float *restrict d, const float *restrict c1, const float *restrict c2,
                      const float *restrict vc, float *restrict e, Py_ssize_t nx, int variance)
{
    if (c2 != NULL) {
        for (Py_ssize_t x = 0; x < nx; x++) {
            float h = fabsf(d[x]) + d[x];
            float t = h * c2[x];
            t = t + c1[x];
            e[x] = h * t + vc[x];
        }
    } else {
        for (Py_ssize_t x = 0; x < nx; x++) {
            float h = fabsf(d[x]) + d[x];
            e[x] = h * c1[x] + vc[x];
        }
    }
    if (!variance)
        for (Py_ssize_t x = 0; x < nx; x++)
            e[x] = sqrtf(e[x]);
}

PyDoc_STRVAR(error_model_doc,
             "error_model(d, c1, c2, var_c, out, variance) -> None\n\n"
             "out = sqrt(h (c1 + c2 h) + var_c) with h = |d| + d (c2 None: h c1 + var_c; variance: no\n"
             "square root), all float32 (rows, nx) with unit column stride.");

static PyObject *error_model(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *od, *o1, *o2, *ov, *oo, *result = NULL;
    int variance;
    if (!PyArg_ParseTuple(args, "OOOOOp", &od, &o1, &o2, &ov, &oo, &variance))
        return NULL;
    held_t h = {"error_model", {{0}}, 0};
    Py_buffer *db, *b1, *b2 = NULL, *bv, *bo;
    if (!(db = take_f32(&h, od, 0, 2, "d")) || !(b1 = take_f32(&h, o1, 0, 2, "c1")) ||
        (o2 != Py_None && !(b2 = take_f32(&h, o2, 0, 2, "c2"))) || !(bv = take_f32(&h, ov, 0, 2, "var_c")) ||
        !(bo = take_f32(&h, oo, 1, 2, "out")))
        goto done;
    Py_ssize_t ny = db->shape[0], nx = db->shape[1];
    int ok = 1;
    for (int i = 0; i < h.n; i++) /* every array: d's shape, unit column stride */
        ok &= h.b[i].shape[0] == ny && h.b[i].shape[1] == nx && h.b[i].strides[1] == 4;
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "error_model: shapes differ or columns not contiguous");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t y = 0; y < ny; y++)
        error_row((const float *)((const char *)db->buf + y * db->strides[0]),
                  (const float *)((const char *)b1->buf + y * b1->strides[0]),
                  b2 != NULL ? (const float *)((const char *)b2->buf + y * b2->strides[0]) : NULL,
                  (const float *)((const char *)bv->buf + y * bv->strides[0]),
                  (float *)((char *)bo->buf + y * bo->strides[0]), nx, variance);
    Py_END_ALLOW_THREADS
    result = none_result();
done:
    release_all(&h);
    return result;
}

static PyMethodDef methods[] = {
    {"lanczos_shift", lanczos_shift, METH_VARARGS, lanczos_shift_doc},
    {"abs_moments", abs_moments, METH_VARARGS, abs_moments_doc},
    {"calibrate_u16", calibrate_u16, METH_VARARGS, calibrate_u16_doc},
    {"error_model", error_model, METH_VARARGS, error_model_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "vampd._kernels", "Compiled kernels of vampd.", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
