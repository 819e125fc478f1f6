"""The Dockerfile, read without a Docker daemon: NGC PyTorch base, extras in step with setup.py, lean context."""
from __future__ import annotations

import ast
import fnmatch
import re
import shlex
from pathlib import Path

import pytest

from run_helpers import REPO

NGC_PYTORCH = re.compile(r"^nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3$")
NOT_IN_IMAGE = {"test", "all"}  # test tooling; the union of the others


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        buf += s
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def base_images(instructions: list[tuple[str, str]]) -> list[str]:
    """FROM images with ``${ARG}`` defaults substituted."""
    args, images = {}, []
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k.strip()] = v.strip().strip('"')
        elif word == "FROM":
            image = rest.split()[0]
            images.append(re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image))
    return images


def pip_install_extras(instructions: list[tuple[str, str]]) -> list[set[str]]:
    """Extras of every ``pip install`` of the local package (``.[a,b]`` / ``-e ".[a,b]"``)."""
    found = []
    for word, rest in instructions:
        if word != "RUN" or "pip" not in rest:
            continue
        for token in shlex.split(rest):
            m = re.fullmatch(r"\.(?:\[([\w,\s-]*)\])?", token)
            if m:
                found.append({e.strip() for e in (m.group(1) or "").split(",") if e.strip()})
    return found


def setup_extras(setup_py: Path) -> set[str]:
    """Keys of ``EXTRAS`` in setup.py: the dict literal plus ``EXTRAS["x"] = ...`` assignments (no import)."""
    keys: set[str] = set()
    for node in ast.walk(ast.parse(setup_py.read_text())):
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            if isinstance(target, ast.Name) and target.id == "EXTRAS" and isinstance(node.value, ast.Dict):
                keys.update(ast.literal_eval(k) for k in node.value.keys)
            elif (isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name)
                  and target.value.id == "EXTRAS"):
                keys.add(ast.literal_eval(target.slice))
    return keys


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, enough for this file: the last matching pattern wins, ``!`` re-includes."""
    ignored = False
    parts = path.split("/")
    for raw in patterns:
        neg = raw.startswith("!")
        pat = raw[1:] if neg else raw
        pat = pat.strip("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatchcase(p, pat) or fnmatch.fnmatchcase(p, pat.replace("**/", "")) for p in prefixes):
            ignored = not neg
    return ignored


@pytest.fixture(scope="module")
def instructions():
    return dockerfile_instructions((REPO / "Dockerfile").read_text())


def test_base_image_is_ngc_pytorch(instructions):
    images = base_images(instructions)
    assert images, "Dockerfile has no FROM"
    assert NGC_PYTORCH.match(images[-1]), f"final stage must build on an NGC PyTorch image, got {images[-1]}"


def test_pip_extras_match_setup_py(instructions):
    installs = pip_install_extras(instructions)
    assert len(installs) == 1, f"expected one pip install of the package, found {installs}"
    defined = setup_extras(REPO / "setup.py")
    assert {"gpu", "hf", "rl", "test"} <= defined, defined  # the parser sees setup.py's extras
    assert installs[0] == defined - NOT_IN_IMAGE, (
        f"Dockerfile installs extras {sorted(installs[0])}, setup.py defines {sorted(defined - NOT_IN_IMAGE)} "
        "for the image")


def test_dockerignore_excludes_runs_and_git_but_not_sources():
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for path in (".git", ".git/HEAD", "runs", "runs/tiny_cpu/latest"):
        assert dockerignored(path, patterns), f"{path} is sent to the Docker build context"
    for path in ("setup.py", "llada_cpt/cli.py", "configs/tiny_cpu.yaml", "launch/slurm.sbatch",
                 "llada_cpt/megatron_patches/cpu.py", "README.md"):
        assert not dockerignored(path, patterns), f"{path} is excluded from the image"


def test_parsers_see_what_they_claim():
    """The helpers above would catch a wrong base image, extras or ignore file."""
    ins = dockerfile_instructions("ARG BASE=ubuntu:22.04\nFROM ${BASE}\nRUN pip install \\\n  -e \".[hf]\"\n")
    assert base_images(ins) == ["ubuntu:22.04"] and not NGC_PYTORCH.match("ubuntu:22.04")
    assert pip_install_extras(ins) == [{"hf"}]
    assert not dockerignored("runs/x", [".git"]) and dockerignored("runs/x", ["runs"])
    assert not dockerignored("runs/x", ["runs", "!runs/x"])
