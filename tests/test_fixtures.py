"""The committed fixtures are reproducible from fixtures/make_fixtures.py."""
import shutil
import subprocess
import sys

from conftest import FIXTURES, ROOT


def test_fixtures_are_reproducible(tmp_path):
    out = tmp_path / "regen"
    p = subprocess.run([sys.executable, str(FIXTURES / "make_fixtures.py"), str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    produced = sorted(f.name for f in out.iterdir() if f.suffix in (".h5", ".keras", ".json"))
    assert len(produced) >= 20
    committed = tmp_path / "committed"
    committed.mkdir()
    for name in produced:
        assert (FIXTURES / name).exists(), f"{name} is generated but not committed"
        shutil.copy(FIXTURES / name, committed / name)
    sys.path.insert(0, str(FIXTURES))
    import make_fixtures
    assert make_fixtures.compare_outputs(str(committed), str(out)) == []


def test_fixtures_are_small():
    total = sum(f.stat().st_size for f in FIXTURES.iterdir()
                if f.is_file() and f.suffix in (".h5", ".keras", ".json"))
    assert total < 1_000_000
