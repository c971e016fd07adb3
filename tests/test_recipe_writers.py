"""The output writers used by `surgeon apply`: clone-and-patch vs rebuild, zip CRC algebra."""
import io
import random
import zipfile
import zlib

import numpy as np
import pytest

from conftest import fixture, load_keras_model
from recipe_helpers import read_all
from surgeon.recipe.execute import apply
from surgeon.formats.keras_patch import CrcTrackingFile, crc32_combine, crc32_zeros
from surgeon.formats.provenance import read_log
from surgeon.recipe import mask, recipe, reinit, rescale


def test_crc32_algebra_matches_zlib():
    rng = random.Random(0)
    for _ in range(20):
        a, b = rng.randbytes(rng.randint(0, 300)), rng.randbytes(rng.randint(0, 300))
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    for n in (0, 1, 7, 1000, 65537):
        assert crc32_zeros(n) == zlib.crc32(bytes(n))


def test_crc_tracking_file_under_random_writes():
    rng = random.Random(1)
    base = rng.randbytes(5000)
    f = io.BytesIO(b"HEADER" + base)
    t = CrcTrackingFile(f, 6, len(base), zlib.crc32(base))
    model = bytearray(base)
    for _ in range(200):
        pos = rng.randint(0, len(model) + 50)
        data = rng.randbytes(rng.randint(1, 400))
        t.seek(pos)
        t.write(data)
        if pos > len(model):
            model.extend(bytes(pos - len(model)))
        model[pos:pos + len(data)] = data
        assert t.size == len(model)
    assert t.crc == zlib.crc32(bytes(model))
    assert f.getvalue()[6:] == bytes(model)


CASES = [
    ("cnn_adam.keras", "out.keras", None),
    ("cnn_adam.weights.h5", "out.weights.h5", "cnn_adam.keras"),
]


@pytest.mark.parametrize("src,name,model", CASES)
def test_patch_and_rebuild_writers_agree(tmp_path, src, name, model):
    ops = [reinit("head/*", seed=2), rescale("conv1/kernel", factor=0.5, slots="follow"),
           mask("conv2/kernel", sparsity=0.5)]
    outs = {}
    for patch in (True, False):
        out = tmp_path / f"{patch}_{name}"
        rec = recipe(input=str(fixture(src)), output=str(out), ops=ops, iteration=9,
                     model=str(fixture(model)) if model else None)
        apply(rec, hash_inputs=False, patch=patch)
        outs[patch] = out
    m = str(fixture(model)) if model else None
    a, b = read_all(outs[True], model=m), read_all(outs[False], model=m)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert int(a["optimizer/iteration"]) == 9
    plans = [read_log(outs[p])[0]["plan"] for p in (True, False)]
    assert plans[0]["steps"] == plans[1]["steps"] and plans[0]["iteration"] == plans[1]["iteration"]
    if name.endswith(".keras"):
        with zipfile.ZipFile(outs[True]) as z, zipfile.ZipFile(fixture(src)) as orig:
            assert z.testzip() is None
            assert z.namelist() == orig.namelist() + ["surgeon/provenance.json"]
            for member in ("config.json", "metadata.json"):
                assert z.read(member) == orig.read(member)
        load_keras_model(outs[True])
    else:
        load_keras_model(outs[True], weights_of=fixture(model))


def test_patched_output_keeps_every_other_byte(tmp_path):
    """Only the edited dataset's bytes differ between input and patched output."""
    src = fixture("cnn_adam.weights.h5")
    out = tmp_path / "o.weights.h5"
    rec = recipe(input=str(src), output=str(out), ops=[rescale("head/bias", factor=2.0)])
    apply(rec, hash_inputs=False)
    a, b = src.read_bytes(), out.read_bytes()
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.frombuffer(a[:n], np.uint8) != np.frombuffer(b[:n], np.uint8))
    assert 0 < diff.size <= 3 * 4 + 64  # the 3 floats of head/bias (+ HDF5 superblock EOF field)
