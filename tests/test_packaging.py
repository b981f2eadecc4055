"""A normal (non-editable) install ships everything a TPU VM needs: build the wheel, install it into a fresh venv
and run `ptm train --print_config` with packaged gin files from a directory that has no checkout in it."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_ships_gin_files_and_runs_from_a_fresh_venv(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("ptm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    gins = [n for n in names if n.endswith(".gin")]
    assert "ptm/gin/models/tiny.gin" in gins and "ptm/gin/runs/sft.gin" in gins and "ptm/gin/meshes/v3-128.gin" in gins
    # Every gin file of the source tree is in the wheel.
    shipped = {str(p.relative_to(REPO)) for p in (REPO / "ptm" / "gin").rglob("*.gin")}
    assert shipped == set(gins)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    vsite = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                capture_output=True, text=True, check=True).stdout.strip())
    # The dependencies come from this environment's site-packages (a path entry: its .pth files, among them the
    # editable install of the checkout, are not processed); ptm itself only from the wheel.
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (vsite / "deps.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(vsite), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([py, "-c", "import ptm; print(ptm.__file__)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(vsite)), where
    out = subprocess.run(
        [py, "-m", "ptm.cli", "train", "--gin_file=models/tiny.gin", "--gin_file=runs/sft.gin",
         "--gin.GENERAL_DATA='g.jsonl'", "--gin.BASE_CKPT=None", "--run_dir=/tmp/never", "--print_config"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ModelConfig.embed_dim = 128" in out.stdout


def test_every_module_level_import_is_a_declared_dependency():
    """A third-party module imported at the top of any ptm module must come from a distribution listed in
    pyproject's core dependencies (etils was imported by ten modules and not declared). Imports inside functions
    may be optional extras, and so may a module whose top-level `try: import X / except ImportError` guard turns a
    missing extra into a clear error (the whole module is then that extra's)."""
    import ast
    import importlib.metadata as md
    import re
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = {re.split(r"[<>=!\[ ;]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}
    owners = md.packages_distributions()
    problems = []
    for path in sorted((REPO / "ptm").rglob("*.py")):
        tree = ast.parse(path.read_text())
        guarded = {a.name.split(".")[0] if isinstance(n, ast.Import) else (n.module or "").split(".")[0]
                   for t in tree.body if isinstance(t, ast.Try)
                   and any(getattr(h.type, "id", "") in ("ImportError", "ModuleNotFoundError") for h in t.handlers)
                   for n in t.body if isinstance(n, ast.Import | ast.ImportFrom)
                   for a in (n.names if isinstance(n, ast.Import) else [n])}
        for node in tree.body:  # module level only
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            for n in names:
                top = n.split(".")[0]
                if top in ("ptm", "__future__") or top in sys.stdlib_module_names or top in guarded:
                    continue
                dists = {d.lower().replace("_", "-") for d in owners.get(top, [])}
                if not dists & declared:
                    problems.append(f"{path.relative_to(REPO)}: imports {top} (from {sorted(dists) or '?'}), "
                                    "not a declared dependency")
    assert not problems, "\n".join(problems)
