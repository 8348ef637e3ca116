"""The package as users install it: a wheel built from the checkout, installed without ``-e`` into a fresh venv.

The editable install the other tests use reads the checkout, so it cannot show a module or a shipped config missing
from the wheel. Here the wheel is built from a copy of the package's sources (no build folders of the checkout), then
installed with ``--no-deps`` into a new venv outside the checkout; that venv finds the dependencies on a path line to
the test venv's site-packages (not processed as a site dir: the editable install's finder is not loaded), so
``f2llm`` can only come from the wheel. There: ``f2llm --help``, an import of every module, the shipped configs by
name, and 3 training steps of a tiny Qwen3 launched with a shipped recipe config.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import HANG_BOUND, ROOT, make_rows, metrics, tiny_qwen3, training_env, write_source

pytestmark = pytest.mark.slow

# What the wheel is built from (pyproject.toml and setup.py name the rest of the tree nothing).
SOURCES = ("f2llm", "kernels", "train", "pyproject.toml", "setup.py", "README.md")


def expected_modules() -> set[str]:
    """Every module of the checkout under the name it is installed as (setup.py's rooms)."""
    rooms = {"f2llm": "f2llm", "kernels": "f2llm.kernels", "train/configs": "f2llm.configs"}
    names = set()
    for folder, package in rooms.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if folder == "f2llm" and parts[0] in ("kernels", "configs"):
                continue
            names.add(".".join((package, *parts)).removesuffix(".__init__"))
    return names


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed; returns the venv folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip"]
    # No build isolation: the test venv's setuptools (a dev dependency) builds it, with no download.
    build = [*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "--quiet", "--wheel-dir", str(tmp / "dist")]
    subprocess.run(build, check=True, capture_output=True, text=True, timeout=HANG_BOUND)
    (wheel,) = (tmp / "dist").glob("f2llm-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=HANG_BOUND)
    python = venv / "bin" / "python"
    install = [*pip, "--python", str(python), "install", "--no-deps", "--no-index", "--quiet", str(wheel)]
    subprocess.run(install, check=True, capture_output=True, text=True, timeout=HANG_BOUND)
    (purelib,) = json.loads(
        run_in(venv, [str(python), "-c", "import site, json; print(json.dumps(site.getsitepackages()))"])
    )
    (Path(purelib) / "_f2llm_test_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return venv


def run_in(venv: Path, cmd: list[str], timeout: float = HANG_BOUND) -> str:
    """Run in the fresh venv, from a folder outside the checkout, with the tests' thread settings."""
    env = training_env(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(cmd, cwd=venv, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{cmd}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return proc.stdout


IMPORT_ALL = """
import importlib, json, pkgutil, sys
import f2llm
from f2llm.config import load_config, shipped_configs
names = ["f2llm"] + [m.name for m in pkgutil.walk_packages(f2llm.__path__, "f2llm.") if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
recipe = load_config("f2llm-0.6b")
print(json.dumps({
    "modules": names,
    "files": {name: sys.modules[name].__file__ for name in names},
    "configs": sorted(shipped_configs()), "jsons": sorted(shipped_configs(".json")),
    "deepspeed_config": recipe.deepspeed_config, "packing": recipe.data.packing,
}))
"""


def test_cli_runs_from_the_wheel(installed: Path) -> None:
    out = run_in(installed, [str(installed / "bin" / "f2llm"), "--help"])
    for command in ("train", "evaluate", "mine", "encode", "merge"):
        assert command in out
    out = run_in(installed, [str(installed / "bin" / "f2llm"), "train", "--help"])
    assert "shipped config" in out


def test_every_module_and_config_is_in_the_wheel(installed: Path) -> None:
    found = json.loads(run_in(installed, [str(installed / "bin" / "python"), "-c", IMPORT_ALL]).splitlines()[-1])
    main_modules = {name for name in expected_modules() if name.endswith("__main__")}
    assert set(found["modules"]) == expected_modules() - main_modules
    for name, file in found["files"].items():  # every one from the venv, none from the checkout
        assert Path(file).is_relative_to(installed), f"{name} imported from {file}"
    assert found["configs"] == sorted(p.name for p in (ROOT / "train" / "configs").glob("*.yaml"))
    assert found["jsons"] == sorted(p.name for p in (ROOT / "train" / "configs").glob("*.json"))
    ds = Path(found["deepspeed_config"])  # the recipe's `deepspeed_config: zero2.json`, the wheel's own copy
    assert ds.is_relative_to(installed) and ds.read_bytes() == (ROOT / "train" / "configs" / "zero2.json").read_bytes()
    assert found["packing"]


def test_a_shipped_recipe_trains_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    """`f2llm train --config f2llm-0.6b` (the recipe's packing, bf16 autocast, checkpointing by budget) with only
    the model, the data and the length changed: 3 steps of a tiny Qwen3 on two sources, then a loadable final/."""
    model = tiny_qwen3(tmp_path)
    write_source(tmp_path / "data" / "msmarco.parquet", make_rows(40, 8))
    write_source(tmp_path / "data" / "imdb.parquet", make_rows(30, 1, prefix="b "))
    out = tmp_path / "run"
    cmd = [
        str(installed / "bin" / "f2llm"), "train", "--config", "f2llm-0.6b",
        "engine=ddp",  # the shipped ZeRO-2 JSON's resolution is checked above; DeepSpeed's start costs a minute
        f"model.name_or_path={model}", "model.max_length=64", "data.max_tokens=256",
        f"data.paths=[{tmp_path / 'data'}]", "data.batch_size=4", f"data.cache_dir={tmp_path / 'cache'}",
        "optim.max_steps=3", "optim.warmup_steps=1", f"output_dir={out}", "log_every=1",
        "tensorboard=false", "plot=false",
    ]  # fmt: skip
    run_in(installed, cmd)
    assert [r["step"] for r in metrics(out) if "train/loss" in r] == [1, 2, 3]
    check = f"from f2llm.encoder import Encoder; print(Encoder.load({str(out / 'final')!r}).encode(['a b c']).shape)"
    assert run_in(installed, [str(installed / "bin" / "python"), "-c", check]).strip().endswith("(1, 64)")
