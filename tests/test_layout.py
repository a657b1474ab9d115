"""The fixed layout survives a clone; import names live under robot_rl; the README opens with the
two commands and they are what the Makefile provides."""

import importlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = ["robot_rl", "drivers", "sim", "policies", "launch", "datasets", "hardware_configs", "tests", "benchmarks"]


def test_every_layout_folder_has_a_readme():
    for folder in LAYOUT:
        readme = ROOT / folder / "README.md"
        assert readme.exists() and len(readme.read_text().strip()) > 40, folder


def test_namespaced_imports_and_no_generic_top_level_names(tmp_path):
    for name in ("robot_rl.drivers", "robot_rl.sim", "robot_rl.policies", "robot_rl.spec"):
        importlib.import_module(name)
    # from outside the checkout (as an installed user sees it), no generic names leak
    names = "('drivers', 'policies', 'sim', 'datasets', 'hardware_configs', 'launch')"
    probe = f"import importlib.util as u; print([n for n in {names} if u.find_spec(n)])"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    blocks = [b for b in text.split("```") if b.strip()]
    first_code = next(b for b in text.split("```")[1::2])
    assert [ln.strip() for ln in first_code.strip().splitlines()[-2:]] == ["make demo", "make test"]
    make = (ROOT / "Makefile").read_text()
    assert "\ndemo:" in make and "\ntest:" in make and "torch==2.14.1" in make and blocks


def test_configs_ship_inside_the_package():
    cfg = ROOT / "robot_rl" / "configs"
    assert (cfg / "config.yaml").exists()
    assert {p.stem for p in (cfg / "task").glob("*.yaml")} >= {"reach", "lift", "peg_insert", "reach_around", "external"}
