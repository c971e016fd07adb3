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


def test_raw_sink_writes_every_change_and_reports_its_crc(tmp_path):
    """The raw write path of clone-and-patch outputs (``RawSink``, used by the local and pool
    executors): an array whose first 8 kB are unchanged but not the rest is written whole,
    and the reported CRC changes, shifted through zlib's crc32_combine, give the file's
    CRC; an unchanged array writes nothing and reports nothing."""
    from surgeon.formats.keras_patch import crc_shift
    from surgeon.formats.rawpatch import RawSink
    old = np.random.default_rng(0).random(4096, dtype=np.float32)  # 16 kB
    path = tmp_path / "member"
    path.write_bytes(b"H" * 100 + old.tobytes() + b"T" * 50)
    crc = zlib.crc32(path.read_bytes())
    sink = RawSink(path, {"x": [(100, old.nbytes, old.dtype.str, old.shape)]}, crc=True)
    new = old.copy()
    new[2048:] *= 0.5
    try:
        done = sink.put("x", new)
        assert sink.put("x", new) == []
    finally:
        sink.close()
    data = path.read_bytes()
    assert data == b"H" * 100 + new.tobytes() + b"T" * 50
    assert len(done) == 1
    for linear, end in done:
        crc ^= crc_shift(linear, len(data) - end)
    assert crc == zlib.crc32(data)


def _sink_run(path, regions, arrays, background):
    """Write ``arrays`` through a CRC-tracking ``RawSink``; the CRC changes it reports."""
    from surgeon.formats.rawpatch import RawSink
    sink = RawSink(path, regions, crc=True)
    if background:
        sink.background()
    try:
        done = []
        for name, arr in arrays:
            done += sink.put(name, arr)
        return done + sink.finish()
    finally:
        sink.close()


def test_background_raw_writes_equal_inline_ones(tmp_path, monkeypatch):
    """``RawSink.background()`` (large tensors written by a thread while the next ones are
    computed): the same bytes as the inline path and CRC changes that, in whatever order
    they come back, give the file's CRC; the hand-over waits when ``PENDING`` is full.
    Every tensor here goes to the thread but the smallest, in 4 kB pieces (thresholds
    lowered); one changes only in its first and last pieces."""
    from surgeon.formats import rawbehind, rawpatch
    from surgeon.formats.keras_patch import crc_shift
    monkeypatch.setattr(rawbehind, "BEHIND_MIN", 1024)
    monkeypatch.setattr(rawbehind, "PENDING", 40_000)
    monkeypatch.setattr(rawpatch, "PIECE", 4096)  # 20000 floats: 20 pieces, the middle unchanged
    rng = np.random.default_rng(3)
    sizes = [10, 3000, 9000, 257, 20000, 6000]
    olds = [rng.random(n, dtype=np.float32) for n in sizes]
    head, regions, pos = b"Z" * 37, {}, 37
    for i, o in enumerate(olds):
        regions[f"t{i}"] = [(pos, o.nbytes, o.dtype.str, o.shape)]
        pos += o.nbytes + 11
    body = head + b"".join(o.tobytes() + b"g" * 11 for o in olds)
    arrays = [(f"t{i}", o * np.float32(0.5) if i != 3 else o) for i, o in enumerate(olds)]
    ends = olds[4].copy()
    ends[:100] += 1
    ends[19_000:] += 1
    arrays[4] = ("t4", ends)
    outs = []
    for background in (False, True):
        path = tmp_path / f"m{background}"
        path.write_bytes(body)
        done = _sink_run(path, regions, arrays, background)
        data, crc = path.read_bytes(), zlib.crc32(body)
        for linear, end in done:
            crc ^= crc_shift(linear, len(data) - end)
        assert crc == zlib.crc32(data) and len(done) == 5
        outs.append(data)
    assert outs[0] == outs[1] != body


def test_background_raw_write_error_reaches_the_caller(tmp_path, monkeypatch):
    """A write failing in the background thread is raised in the caller (here: the old
    bytes of a region past the end of the file cannot be read back)."""
    from surgeon.formats import rawbehind
    monkeypatch.setattr(rawbehind, "BEHIND_MIN", 1)
    path = tmp_path / "m"
    path.write_bytes(b"x" * 64)
    arr = np.ones(100, np.float32)
    with pytest.raises(OSError, match="short read"):
        _sink_run(path, {"x": [(1000, arr.nbytes, arr.dtype.str, arr.shape)]}, [("x", arr)], True)


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
