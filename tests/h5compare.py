"""Bit-exact comparison of HDF5 trees and .keras archives (test helper)."""
import zipfile

import h5py
import numpy as np


def h5_tree(source):
    out = {}
    with h5py.File(source, "r") as f:
        out["/"] = ("attrs", sorted((k, repr(f.attrs[k])) for k in f.attrs))

        def visit(name, obj):
            attrs = sorted((k, repr(obj.attrs[k])) for k in obj.attrs)
            if isinstance(obj, h5py.Dataset):
                arr = obj[()]
                out[name] = ("ds", str(obj.dtype), obj.shape, np.asarray(arr).tobytes(), attrs)
            else:
                out[name] = ("group", attrs)

        f.visititems(visit)
    return out


def assert_h5_equal(a, b):
    ta, tb = h5_tree(a), h5_tree(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k] == tb[k], k


def assert_keras_zip_equal(a, b):
    import io
    with zipfile.ZipFile(a) as za, zipfile.ZipFile(b) as zb:
        assert za.namelist() == zb.namelist()
        for n in za.namelist():
            if n.endswith(".h5"):
                assert_h5_equal(io.BytesIO(za.read(n)), io.BytesIO(zb.read(n)))
            else:
                assert za.read(n) == zb.read(n), n
