"""surgeon diff --series and --plot: drift over checkpoints, PNGs opened and measured."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, fixture, run_cli
from surgeon import open_checkpoint, open_writer
from surgeon.inspect.report import PLOT_SIZE

BASE = "cnn_adam.keras"


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """A fake 'training run': ckpt-1 = base, ckpt-2 / ckpt-10 move head/kernel further."""
    d = tmp_path_factory.mktemp("run")
    paths = [d / "ckpt-1.keras", d / "ckpt-2.keras", d / "ckpt-10.keras"]
    for path, scale in zip(paths, (1.0, 1.1, 1.5)):
        with open_checkpoint(fixture(BASE)) as r, open_writer(path, like=r) as w:
            base = r.read("head/kernel")
            w.write("head/kernel", base * np.float32(scale))
            w.finalize()
    return d, paths, base


def _imread(path):
    import matplotlib.image
    return matplotlib.image.imread(str(path))


def test_series_drift_matches_numpy(run):
    d, paths, base = run
    res = run_cli("diff", "--series", *paths, "--json")
    assert res.exit_code == 0, res.output
    js = json.loads(res.output)
    assert [c["path"] for c in js["checkpoints"]] == [str(p) for p in paths]
    layers = {ly["layer"]: ly for ly in js["layers"]}
    assert list(layers) == ["conv1", "bn", "conv2", "frozen", "head"]
    kb = np.linalg.norm(base.astype(np.float64))
    bias = open_checkpoint(fixture(BASE))
    with bias:
        hb = np.linalg.norm(bias.read("head/bias").astype(np.float64))
    head_norm = np.sqrt(kb ** 2 + hb ** 2)
    for got, scale in zip(layers["head"]["drift"], (1.0, 1.1, 1.5)):
        want = np.linalg.norm(base.astype(np.float64) * np.float32(scale) - base) / head_norm
        assert got == pytest.approx(want, rel=1e-6)
    assert layers["head"]["step"][0] is None
    assert layers["conv1"]["drift"] == [0.0, 0.0, 0.0]


def test_series_directory_natural_order_and_text(run):
    d, paths, _ = run
    res = run_cli("diff", "--series", d)
    assert res.exit_code == 0
    lines = res.output.splitlines()
    assert lines[0] == f"drift of each layer's weights from {paths[0]} (relative L2 change)"
    assert lines[1].split() == ["layer", "ckpt-1.keras", "ckpt-2.keras", "ckpt-10.keras"]
    assert lines[2].split() == ["(iteration)", "3", "3", "3"]
    head = next(ln for ln in lines if ln.startswith("head "))
    assert head.split()[1] == "0"
    md = run_cli("diff", "--series", d, "--markdown").output
    assert md.startswith("| layer | `ckpt-1.keras` | `ckpt-2.keras` | `ckpt-10.keras` |")


def test_series_needs_two(tmp_path):
    res = run_cli("diff", "--series", fixture(BASE))
    assert res.exit_code == 2
    assert res.output.strip() == "surgeon: error: --series needs at least 2 checkpoints, got 1"
    res = run_cli("diff", "--series", tmp_path)
    assert res.exit_code == 2
    assert res.output.strip() == f"surgeon: error: {tmp_path}: directory holds no checkpoints for --series"


def test_diff_plot_png(run, tmp_path):
    _, paths, _ = run
    png = tmp_path / "diff.png"
    res = run_cli("diff", fixture(BASE), paths[2], "--plot", png)
    assert res.exit_code == 1
    img = _imread(png)
    assert img.shape[:2] == (PLOT_SIZE[1], PLOT_SIZE[0]) == (500, 1200)
    assert img[..., :3].std() > 0.05  # something was drawn


def test_series_plot_png(run, tmp_path):
    d, _, _ = run
    png = tmp_path / "series.png"
    res = run_cli("diff", "--series", d, "--plot", png)
    assert res.exit_code == 0
    assert _imread(png).shape[:2] == (500, 1200)


def test_plot_written_atomically(run, tmp_path, monkeypatch):
    """A plot that fails half-written leaves the previous file intact and no temp behind."""
    from matplotlib.figure import Figure
    _, paths, _ = run
    png = tmp_path / "diff.png"
    png.write_bytes(b"previous plot")

    def half_written(self, fname, **kw):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Figure, "savefig", half_written)
    res = run_cli("diff", fixture(BASE), paths[2], "--plot", png)
    assert res.exit_code == 2 and "cannot write plot: No space left on device" in res.output
    assert png.read_bytes() == b"previous plot"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diff.png"]


def test_plot_without_matplotlib_is_a_clear_error(tmp_path):
    code = ("import sys\nsys.modules['matplotlib'] = None\n"
            "from click.testing import CliRunner\nfrom surgeon.cli import main\n"
            f"r = CliRunner().invoke(main, ['diff', r'{fixture(BASE)}', r'{fixture(BASE)}', '--plot', "
            f"r'{tmp_path / 'x.png'}'])\nprint(r.exit_code); print(r.output)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    lines = out.stdout.splitlines()
    assert lines[0] == "2"
    assert lines[1] == ("surgeon: error: --plot needs matplotlib, which is not installed: "
                        "pip install 'surgeon[plot]'")
    assert not (tmp_path / "x.png").exists()
