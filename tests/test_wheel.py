"""The wheel: it holds the Flower app, the configs and the prostate splits, and installed into a fresh
virtual environment (no source checkout on its path) it runs `iopfl demo` and a loopback Flower
deployment of the packaged app.

Offline and fast: the wheel is built without build isolation from a copy of the sources (a stale
``build/`` folder in the checkout can never leak into it), and the fresh environment borrows the
dependencies of the running one (pip included) through a folder of links that leaves iopfl itself
out (a ``.pth`` file names that folder). pip does not write console scripts for borrowed packages, so Flower's
(``flwr``, ``flower-superlink``, ...) are written from its entry points, as pip would.
``scripts/wheel_check.sh`` does the same with a real install from the package index.
"""

import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from iopfl import CONFIG_DIR
from iopfl.engine.flower import app_folder

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "iopfl"
SITES = ["SiteA", "SiteB"]
TINY = [
    "data.image_size=32",
    "model.width=4",
    "model.depth=2",
    "fl.rounds=1",
    "eval.eval_every=1",
    "eval.overlays=0",
    "runtime.threads=1",
]


def test_one_copy_of_the_configs():
    """``configs/`` at the top is the package's folder (a link), not a second copy."""
    top = ROOT / "configs"
    assert not top.exists() or top.resolve() == CONFIG_DIR.resolve()
    assert CONFIG_DIR.resolve() == (PACKAGE / "configs").resolve()


def iopfl_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "iopfl.cli", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def test_flower_app_prints_the_packaged_folder_or_copies_it(tmp_path):
    assert Path(iopfl_cli("flower", "app").stdout.strip()) == app_folder()
    done = iopfl_cli("flower", "app", tmp_path / "my-app")
    assert done.returncode == 0 and Path(done.stdout.strip()) == tmp_path / "my-app"
    copied = {p.name: p.read_bytes() for p in (tmp_path / "my-app").iterdir()}
    assert copied == {p.name: p.read_bytes() for p in app_folder().iterdir()} and "pyproject.toml" in copied
    (tmp_path / "my-app" / "pyproject.toml").write_text("edited")
    again = iopfl_cli("flower", "app", tmp_path / "my-app")
    assert again.returncode == 2 and "pyproject.toml already exists" in again.stderr
    assert "Traceback" not in again.stderr and (tmp_path / "my-app" / "pyproject.toml").read_text() == "edited"


def test_configs_copy_writes_nothing_when_a_file_exists(tmp_path):
    assert Path(iopfl_cli("configs").stdout.strip()) == CONFIG_DIR
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "polyp.yaml").write_text("mine")
    done = iopfl_cli("configs", tmp_path / "c")
    assert done.returncode == 2 and "polyp.yaml already exists" in done.stderr and "Traceback" not in done.stderr
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["polyp.yaml"]
    (tmp_path / "f").write_text("")
    assert "is a file" in iopfl_cli("configs", tmp_path / "f").stderr
    assert iopfl_cli("configs", tmp_path / "new").returncode == 0
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == sorted(p.name for p in CONFIG_DIR.iterdir())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(work / "dist"),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return next((work / "dist").glob("iopfl-*.whl"))


def packaged(path: Path) -> str:
    return path.resolve().relative_to(PACKAGE.parent).as_posix()


@pytest.mark.slow
def test_wheel_holds_the_app_configs_and_splits(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = [packaged(p) for p in app_folder().iterdir()] + [packaged(p) for p in CONFIG_DIR.glob("*.yaml")]
    expected.append(packaged(PACKAGE / "data" / "prostate_splits.json"))
    assert (app_folder() / "pyproject.toml").is_file()
    assert set(expected) <= names, sorted(set(expected) - names)
    assert all(n.startswith(("iopfl/", "iopfl-")) for n in names)  # nothing of tests/, benchmarks/, ...


def borrow_dependencies(env: Path, deps: Path) -> None:
    """Make the running environment's packages, except iopfl, importable in ``env``."""
    deps.mkdir()
    for folder in dict.fromkeys(Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")):
        for entry in folder.iterdir():
            skip = entry.name.startswith(("iopfl", "__editable__", "__pycache__")) or entry.suffix == ".pth"
            if not skip and not (deps / entry.name).exists():
                (deps / entry.name).symlink_to(entry)
    purelib = subprocess.run(
        [str(env / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "borrowed-dependencies.pth").write_text(f"{deps}\n")


def write_flower_scripts(env: Path) -> None:
    """Flower's console scripts in ``env/bin``, running ``env``'s Python."""
    for ep in importlib.metadata.distribution("flwr").entry_points.select(group="console_scripts"):
        module, _, attr = ep.value.partition(":")
        script = env / "bin" / ep.name
        script.write_text(f"#!{env / 'bin' / 'python'}\nimport sys\nfrom {module} import {attr}\nsys.exit({attr}())\n")
        script.chmod(0o755)


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    pytest.importorskip("flwr")
    work = tmp_path_factory.mktemp("venv")
    env = work / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    borrow_dependencies(env, work / "deps")
    write_flower_scripts(env)
    done = subprocess.run(
        [str(env / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return env


def installed_env(work: Path) -> dict[str, str]:
    """No source checkout on the path; data caches and Flower's home under ``work``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(
        IOPFL_CACHE=str(work / "cache"), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", OMP_NUM_THREADS="1"
    )
    return env


def run_in(venv: Path, work: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]],
        cwd=work,
        env=installed_env(work),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"{args}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def demo(venv, tmp_path_factory):
    """`iopfl demo` in the installed environment, started in the background: it runs while the
    deployment test's Flower processes mostly wait for each other. Yields (folder, process)."""
    work = tmp_path_factory.mktemp("demo")
    synthetic = [
        "data.synthetic.sites=3",
        "data.synthetic.cases=3",
        "data.synthetic.size=32",
        "data.synthetic.slices=4",
    ]
    args = [a for o in [*TINY, *synthetic] for a in ("-o", o)]
    with (work / "demo.log").open("w") as log:
        proc = subprocess.Popen(
            [str(venv / "bin" / "iopfl"), "demo", "--out", "demo", *args],
            cwd=work,
            env=installed_env(work),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    yield work, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_installed_wheel_is_not_the_checkout(venv, tmp_path):
    where = run_in(venv, tmp_path, "python", "-c", "import iopfl; print(iopfl.__file__)").stdout.strip()
    assert Path(where).is_relative_to(venv)
    app = Path(run_in(venv, tmp_path, "iopfl", "flower", "app").stdout.strip())
    assert app.is_relative_to(venv) and (app / "pyproject.toml").is_file()
    configs = Path(run_in(venv, tmp_path, "iopfl", "configs").stdout.strip())
    assert configs.is_relative_to(venv)
    assert sorted(p.name for p in configs.glob("*.yaml")) == sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
    run_in(venv, tmp_path, "iopfl", "flower", "app", "my-app")
    assert (tmp_path / "my-app" / "pyproject.toml").read_bytes() == (app / "pyproject.toml").read_bytes()


DRIVER = Path(__file__).resolve().parent / "_deploy_installed.py"  # run with the installed environment's Python


def stop_leftovers(pids_file: Path) -> None:
    """Kill the process group of every Flower process the driver started (normally all gone already)."""
    for pid in json.loads(pids_file.read_text()) if pids_file.exists() else []:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.mark.slow
@pytest.mark.usefixtures("demo")  # the demo runs meanwhile
def test_loopback_deployment_of_the_packaged_app(venv, tmp_path):
    app = Path(run_in(venv, tmp_path, "iopfl", "flower", "app").stdout.strip())
    config = Path(run_in(venv, tmp_path, "iopfl", "configs").stdout.strip()) / "demo.yaml"
    run_in(venv, tmp_path, "iopfl", "synth", "data", "--sites", "2", "--cases", "3", "--size", "32", "--slices", "4")
    overrides = ["data.source=prostate", f"data.root={tmp_path / 'data'}", *TINY]
    pids = tmp_path / "pids.json"
    driver = subprocess.Popen(
        [
            str(venv / "bin" / "python"),
            str(DRIVER),
            str(tmp_path / "home"),
            str(tmp_path / "data"),
            str(config),
            str(tmp_path / "run"),
            str(pids),
            json.dumps(SITES),
            json.dumps(overrides),
        ],
        cwd=tmp_path,
        env=installed_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = driver.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        driver.terminate()  # the driver stops its deployment (SIGTERM → SystemExit → Deployment.stop)
        out, err = driver.communicate(timeout=60)
    finally:
        stop_leftovers(pids)
    assert driver.returncode == 0, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert Path(report["app"]) == app
    assert report["status"] == "finished:completed", f"{report['output']}\n{report['logs']}"
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["models"]["global"]["sites"]) == set(SITES)
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["engine"] == "flower"


@pytest.mark.slow
def test_installed_wheel_runs_the_demo(demo):
    work, proc = demo
    assert proc.wait(timeout=300) == 0, (work / "demo.log").read_text()[-3000:]
    for run in ("fedavg", "iopfl", "iopfl-without-SiteC"):
        assert json.loads((work / "demo" / run / "results.json").read_text())["models"]
    assert "Outside: unseen site SiteC" in (work / "demo" / "report.md").read_text()
