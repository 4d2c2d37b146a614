"""No folder that the project puts on ``sys.path`` defines a top-level package or module whose
name a dependency imports. A script's own folder goes first on ``sys.path`` when it is started
(``deepspeed tests/ds_worker.py``, ``python launch/train.py``), so a ``tests/kernels/`` package
once hid the PyPI ``kernels`` package that transformers imports, and every worker died in
``import transformers``."""

import ast
import importlib.metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OURS = {"lgtm_ds", "lgtm_kernels", "tests"}
# What the dependencies import, installed here or not (optional extras included).
DEPENDENCY_NAMES = {
    "kernels",
    "datasets",
    "transformers",
    "tokenizers",
    "accelerate",
    "peft",
    "deepspeed",
    "torch",
    "triton",
    "wandb",
    "gguf",
    "safetensors",
    "huggingface_hub",
    "pydantic",
    "yaml",
    "numpy",
    "scipy",
    "sklearn",
    "matplotlib",
    "tqdm",
    "pytest",
}
SKIP_DIRS = {".git", ".venv", "build", "outputs", "runs", "wandb", ".torch_extensions", ".whl"}


def _is_script(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Name):
            if node.left.id == "__name__":
                return True
    return False


def _sys_path_folders() -> list[Path]:
    """The repository root (scripts run from it; workers insert it), kernels/ (the tests' source
    fallback for lgtm_kernels), and every folder that holds a script or a worker."""
    out = {ROOT, ROOT / "kernels"}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if set(rel.parts) & SKIP_DIRS or rel.parts[0] == "lgtm_ds":
            continue
        if path.parent.name == "tests" or path.parent.name == "launch" or _is_script(path):
            out.add(path.parent)
    return sorted(out)


def _top_level_names(folder: Path) -> dict[str, Path]:
    """Names ``import NAME`` would find in ``folder``: modules, packages and namespace folders
    that hold Python files."""
    out = {}
    for child in folder.iterdir():
        if child.name in SKIP_DIRS or child.name.startswith("."):
            continue
        if child.is_file() and child.suffix == ".py":
            out[child.stem] = child
        elif child.is_dir() and ((child / "__init__.py").exists() or any(child.glob("*.py"))):
            out[child.name] = child
    return out


def _dependency_names() -> set[str]:
    installed = set(importlib.metadata.packages_distributions())
    return (installed | DEPENDENCY_NAMES) - OURS


def test_no_folder_on_sys_path_shadows_a_dependency():
    deps = _dependency_names()
    clashes = [
        f"{path.relative_to(ROOT)} would hide the installed/imported package {name!r}"
        for folder in _sys_path_folders()
        for name, path in _top_level_names(folder).items()
        if name in deps
    ]
    assert not clashes, "\n".join(clashes)


def test_the_check_sees_the_places_it_guards():
    folders = _sys_path_folders()
    for must in (ROOT, ROOT / "tests", ROOT / "launch"):
        assert must in folders
    assert "kernels" in _dependency_names() and "transformers" in _dependency_names()
