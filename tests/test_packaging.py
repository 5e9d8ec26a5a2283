"""What a user installs: the wheel holds every file of the package (the code, the shipped model, the web page) and
the `vidsynth` command."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path


def test_the_wheel_holds_the_whole_package(tmp_path):
    root, source = Path(__file__).resolve().parent.parent, tmp_path / "source"
    # Built from a copy: setuptools leaves a build/ folder behind, whose stale files would go into later wheels.
    shutil.copytree(root / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    [wheel] = (tmp_path / "dist").glob("vidsynth-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = archive.read(next(name for name in names if name.endswith(".dist-info/entry_points.txt")))
    package = source / "src" / "vidsynth"
    assert {name.removeprefix("vidsynth/") for name in names if name.startswith("vidsynth/")} == \
        {path.relative_to(package).as_posix() for path in package.rglob("*") if path.is_file()}
    assert "vidsynth = vidsynth.cli:entry_point" in entry_points.decode()
