"""The package installed from a wheel carries its notebooks and recipes and finds them without a checkout."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_wheel_ships_the_notebooks_and_recipes_and_finds_them_outside_a_checkout(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("tongue_nb-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        assert f"tongue_nb/_resources/notebooks/{nb.name}" in names
    for recipe in sorted((ROOT / "params").glob("*.yaml")):
        assert f"tongue_nb/_resources/params/{recipe.name}" in names
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    probe = ("import tongue_nb.resources as r, tongue_nb.pipeline.sweep as s; "
             "print(r.CHECKOUT, s.NOTEBOOKS, (s.NOTEBOOKS / '03_train.ipynb').is_file(), "
             "(s.PARAMS_DIR / 'smoke.yaml').is_file())")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    checkout, notebooks, has_nb, has_recipe = out.stdout.split()
    assert checkout == "None" and notebooks.startswith(str(target)) and has_nb == "True" and has_recipe == "True"
