"""Decode a stored JPEG the way FFCV does (libjpeg-turbo's TurboJPEG API, through ctypes), so that what one
reader finds damaged `--verify` finds too: TurboJPEG fails on libjpeg's corrupt-data warnings ("Corrupt
JPEG data: 567 extraneous bytes before marker 0xd9"), which PIL decodes past without a word. Where the
library is missing (the GPU machine has no FFCV), PIL decodes instead."""
import ctypes
import ctypes.util
import functools
import io

_TJPF_RGB = 0


@functools.cache
def _turbojpeg():
    name = ctypes.util.find_library("turbojpeg")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    lib.tjInitDecompress.restype = ctypes.c_void_p
    lib.tjDecompressHeader3.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ulong] + [
        ctypes.POINTER(ctypes.c_int)] * 4
    lib.tjDecompress2.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p] + [
        ctypes.c_int] * 5
    lib.tjGetErrorStr2.argtypes, lib.tjGetErrorStr2.restype = [ctypes.c_void_p], ctypes.c_char_p
    lib.tjDestroy.argtypes = [ctypes.c_void_p]
    return lib


def decode_size(data):
    """(width, height) of JPEG `data` after decoding all of it; ValueError saying why it does not decode."""
    lib = _turbojpeg()
    if lib is None:
        return _pil_size(data)
    handle = lib.tjInitDecompress()
    try:
        w, h, sub, space = (ctypes.c_int() for _ in range(4))
        if lib.tjDecompressHeader3(handle, data, len(data), *(ctypes.byref(v) for v in (w, h, sub, space))):
            raise ValueError(lib.tjGetErrorStr2(handle).decode(errors="replace"))
        pixels = ctypes.create_string_buffer(w.value * h.value * 3)
        if lib.tjDecompress2(handle, data, len(data), pixels, w.value, 0, h.value, _TJPF_RGB, 0):
            raise ValueError(lib.tjGetErrorStr2(handle).decode(errors="replace"))
        return w.value, h.value
    finally:
        lib.tjDestroy(handle)


def _pil_size(data):
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.size
    except Exception as err:  # corrupt data surfaces as many exception types inside the decoder
        raise ValueError(str(err)) from None
