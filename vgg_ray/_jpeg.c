/* Region-of-interest JPEG decoding for the training crops (issue 16, item 4).

A training crop covers 15-60% of a typical ImageNet photo, yet a full decode runs the IDCT,
chroma upsampling and colour conversion on every pixel. libjpeg-turbo can do less:
`jpeg_crop_scanline` restricts those stages to the iMCU columns around the window and
`jpeg_skip_scanlines` entropy-decodes the rows above it without reconstructing them; the rows
below are never read. The pixels inside the window are the full decode's.

No maintained Python binding exposes these two calls, and a ctypes binding cannot be made safe:
libjpeg reports a corrupt file through `error_exit`, which must longjmp out of the decoder, and a
Python callback cannot. Hence these ~150 lines, built by `pip install` as the top-level module
`_vgg_ray_jpeg` where the system has libjpeg-turbo's headers (Debian/Ubuntu: libjpeg-dev);
without them the build is skipped and `vgg_ray.transforms` decodes whole images with
torchvision instead. Top-level, so that a Ray job's working-dir copy of `vgg_ray` (uploaded
without built files) still finds the installed module.

Errors never reach the caller's process: any libjpeg error becomes a ValueError (the Python side
then tries torchvision's decoder, which takes what libjpeg's RGB output cannot, such as CMYK).
So does a warning about the data (a truncated file, which libjpeg would grey-fill; corrupt
entropy data), as torchvision refuses those files too: a damaged image is left out, not trained
on. Damage below the window goes unseen, and the window's pixels are intact.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>

/* Scanlines asked of libjpeg per call: fewer calls, each a few rows of one iMCU. */
#define ROWS_PER_READ 16

struct error_manager {
    struct jpeg_error_mgr pub;
    jmp_buf escape;
    char message[JMSG_LENGTH_MAX];
};

static void on_error(j_common_ptr cinfo) {
    struct error_manager *err = (struct error_manager *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->escape, 1);
}

/* Level -1 is a warning about the data: an error here. Trace messages (>= 0) are dropped. */
static void on_emit(j_common_ptr cinfo, int msg_level) {
    if (msg_level < 0) on_error(cinfo);
}

/* Ready `cinfo` to report through `err`. The caller sets its longjmp target next, then calls
   `open_source`: every libjpeg call after that may longjmp back (an empty buffer already does). */
static void prepare(struct jpeg_decompress_struct *cinfo, struct error_manager *err) {
    memset(cinfo, 0, sizeof(*cinfo)); /* jpeg_destroy_decompress is safe on it from here */
    cinfo->err = jpeg_std_error(&err->pub);
    err->pub.error_exit = on_error;
    err->pub.emit_message = on_emit;
    err->message[0] = '\0';
}

static void open_source(struct jpeg_decompress_struct *cinfo, const Py_buffer *data) {
    jpeg_create_decompress(cinfo);
    jpeg_mem_src(cinfo, (const unsigned char *)data->buf, (unsigned long)data->len);
    jpeg_read_header(cinfo, TRUE);
}

static PyObject *size(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer data;
    struct jpeg_decompress_struct cinfo;
    struct error_manager err;
    if (!PyArg_ParseTuple(args, "y*", &data)) return NULL;
    prepare(&cinfo, &err);
    if (setjmp(err.escape)) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, err.message);
        return NULL;
    }
    open_source(&cinfo, &data);
    unsigned int height = cinfo.image_height, width = cinfo.image_width;
    jpeg_destroy_decompress(&cinfo);
    PyBuffer_Release(&data);
    return Py_BuildValue("(II)", height, width);
}

static PyObject *decode_window(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer data;
    int top, left, height, width, shrink = 1;
    struct jpeg_decompress_struct cinfo;
    struct error_manager err;
    /* volatile: read after a longjmp, written after the setjmp */
    unsigned char *volatile row = NULL;
    PyObject *volatile out = NULL;
    if (!PyArg_ParseTuple(args, "y*iiii|i", &data, &top, &left, &height, &width, &shrink))
        return NULL;
    if (shrink != 1 && shrink != 2 && shrink != 4 && shrink != 8) {
        PyBuffer_Release(&data);
        PyErr_Format(PyExc_ValueError, "shrink must be 1, 2, 4 or 8, got %d", shrink);
        return NULL;
    }
    prepare(&cinfo, &err);
    if (setjmp(err.escape)) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        free(row);
        Py_XDECREF(out);
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, err.message);
        return NULL;
    }
    open_source(&cinfo, &data);
    /* 1/shrink of the image, inside the decoder (a reduced IDCT): the window is in its pixels. */
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)shrink;
    cinfo.out_color_space = JCS_RGB;
    jpeg_calc_output_dimensions(&cinfo);
    if (top < 0 || left < 0 || height < 1 || width < 1 ||
        (unsigned int)top + (unsigned int)height > cinfo.output_height ||
        (unsigned int)left + (unsigned int)width > cinfo.output_width) {
        PyErr_Format(PyExc_ValueError, "window (%d, %d, %d, %d) is outside the %ux%u image", top,
                     left, height, width, cinfo.output_width, cinfo.output_height);
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        return NULL;
    }
    jpeg_start_decompress(&cinfo);
    /* libjpeg widens the crop to whole iMCU columns on the left (the window then starts
       `left - xoffset` pixels into a row), and upsamples the chroma of the crop's first and
       last columns as an image edge: one chroma sample more on each side keeps the window's
       pixels exactly the full decode's. */
    const JDIMENSION margin = (JDIMENSION)cinfo.max_h_samp_factor;
    JDIMENSION xoffset = (JDIMENSION)left > margin ? (JDIMENSION)left - margin : 0;
    JDIMENSION crop_width = (JDIMENSION)(left + width) + margin - xoffset;
    if (xoffset + crop_width > cinfo.output_width) crop_width = cinfo.output_width - xoffset;
    if (crop_width < cinfo.output_width) jpeg_crop_scanline(&cinfo, &xoffset, &crop_width);
    if (top > 0) jpeg_skip_scanlines(&cinfo, (JDIMENSION)top);
    out = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)height * width * 3);
    const size_t row_bytes = (size_t)cinfo.output_width * cinfo.output_components;
    row = malloc(ROWS_PER_READ * row_bytes);
    if (out == NULL || row == NULL) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        longjmp(err.escape, 1);
    }
    JSAMPROW rows[ROWS_PER_READ];
    for (int k = 0; k < ROWS_PER_READ; k++) rows[k] = row + k * row_bytes;
    unsigned char *pixels = (unsigned char *)PyByteArray_AS_STRING(out);
    const size_t skip = (size_t)(left - (int)xoffset) * 3, stride = (size_t)width * 3;
    for (int y = 0; y < height;) {
        const int want = height - y < ROWS_PER_READ ? height - y : ROWS_PER_READ;
        const int got = (int)jpeg_read_scanlines(&cinfo, rows, (JDIMENSION)want);
        if (got < 1) ERREXIT(&cinfo, JERR_BAD_STATE); /* cannot happen with an in-memory source */
        for (int k = 0; k < got; k++) memcpy(pixels + (y + k) * stride, rows[k] + skip, stride);
        y += got;
    }
    /* The rows below the window are never decoded. */
    jpeg_abort_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    PyBuffer_Release(&data);
    free(row);
    return out;
}

static PyMethodDef methods[] = {
    {"size", size, METH_VARARGS,
     "size(data) -> (height, width): a JPEG's dimensions, from its header alone."},
    {"decode_window", decode_window, METH_VARARGS,
     "decode_window(data, top, left, height, width, shrink=1) -> bytearray: the window's RGB "
     "pixels, height x width x 3, of the image decoded at 1/shrink (1, 2, 4 or 8), decoding "
     "no more of it than the window needs."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_vgg_ray_jpeg", .m_size = -1, .m_methods = methods};

PyMODINIT_FUNC PyInit__vgg_ray_jpeg(void) { return PyModule_Create(&module); }
