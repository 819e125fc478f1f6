"""What a fresh install gets: import names that cannot collide, and the recipes in a wheel.

A top-level ``kernels`` package of ours once shadowed Hugging Face's ``kernels`` distribution
(which transformers imports) and broke every fresh install; these tests keep that from coming back.
"""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from setuptools import find_packages

from conftest import REPO

OURS = {"llada_cpt"}
DIST = "llada-cpt"


def importable_names_at_root(root: Path) -> set:
    """Names ``import NAME`` finds in ``root`` (what ``python -m pytest`` puts first on sys.path)."""
    names = set()
    for entry in root.iterdir():
        if entry.is_dir() and (entry / "__init__.py").is_file():
            names.add(entry.name)
        elif entry.suffix == ".py" and entry.name != "setup.py":
            names.add(entry.stem)
    return names


def foreign_owners(names: set) -> dict:
    """Top-level names also provided by another installed distribution, with those distributions."""
    owners = importlib.metadata.packages_distributions()
    return {n: sorted(set(owners.get(n, [])) - {DIST}) for n in names if set(owners.get(n, [])) - {DIST}}


def test_the_only_shipped_import_name_is_ours():
    shipped = {p.split(".")[0] for p in find_packages(where=str(REPO), include=["llada_cpt", "llada_cpt.*"])}
    assert shipped == OURS
    assert not foreign_owners(shipped), "an import name of ours is also a published distribution's"


def test_nothing_else_is_importable_from_the_repository_root():
    """``kernels/`` and ``benchmarks/`` hold scripts, not packages: no ``__init__.py`` there."""
    extra = importable_names_at_root(REPO) - OURS
    assert not extra, (f"importable from the repository root: {sorted(extra)}; move them under llada_cpt/ "
                       f"(clashes with installed distributions: {foreign_owners(extra)})")


def test_guard_sees_a_kernels_package_put_back(tmp_path):
    """The check above fails on the layout that broke installs (a top-level kernels/__init__.py)."""
    (tmp_path / "llada_cpt").mkdir()
    (tmp_path / "llada_cpt" / "__init__.py").touch()
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").touch()
    assert importable_names_at_root(tmp_path) - OURS == {"kernels"}
    if "kernels" in importlib.metadata.packages_distributions():  # Hugging Face's, with transformers>=5
        assert "kernels" in foreign_owners({"kernels"})


def test_transformers_hub_kernels_import_from_the_repository_root():
    """``python -c`` puts the working directory first on sys.path, as ``python -m pytest`` does."""
    pytest.importorskip("transformers")
    code = ("import transformers.activations, transformers.integrations.hub_kernels, llada_cpt.kernels.registry;"
            "import sys; print(sys.modules['llada_cpt'].__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(REPO)], check=True, capture_output=True, timeout=600)
    (whl,) = out.glob("llada_cpt-*.whl")
    return whl


def test_wheel_ships_only_llada_cpt_and_the_recipes(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == OURS
    recipes = {Path(n).name for n in names if n.startswith("llada_cpt/configs/")}
    assert {"tiny_cpu.yaml", "tiny_sft.yaml", "qwen3_dense_cpt.yaml"} <= recipes
    assert "llada_cpt/kernels/flex.py" in names and "llada_cpt/megatron_patches/cpu.py" in names
    assert any(n.startswith("llada_cpt/data/bundled/") for n in names)
    # the harness tasks of `llada-cpt lm-eval` (YAML found through --include_path, loaders beside them)
    assert {"llada_cpt/eval_tasks/llada_arith.yaml", "llada_cpt/eval_tasks/llada_arith_mc.yaml",
            "llada_cpt/eval_tasks/llada_text_ppl.yaml", "llada_cpt/eval_tasks/docs.py"} <= set(names)


def test_named_recipe_from_any_folder_in_a_wheel_install(wheel, tmp_path):
    """``pip install .`` (not -e), then ``llada-cpt train -c tiny_cpu`` from a folder without configs/."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = [sys.executable, "-c", "import sys; from llada_cpt.cli import main; sys.exit(main())"]
    out = subprocess.run(run + ["train", "-c", "tiny_cpu", "--dry-run"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "seq_length" in out.stdout
    where = subprocess.run([sys.executable, "-c", "import llada_cpt.config.loader as m; print(m.RECIPES_DIR)"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert Path(where.stdout.strip()).is_relative_to(target)  # the wheel's copy, not the repository's
    bad = subprocess.run(run + ["train", "-c", "tiny_cpux", "--dry-run"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert "Did you mean the recipe `tiny_cpu`" in bad.stderr and "Traceback" not in bad.stderr
