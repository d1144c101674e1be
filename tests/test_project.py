"""Project-level promises: CI runs the README's test command; the package imports without ComfyUI;
the Comfy Registry metadata is complete and consistent."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hif4_reference import VECTORS, vector_cases

ROOT = Path(__file__).resolve().parents[1]
# The vectors in the project's shared folder, when this checkout has it beside it (CI has; a
# clone may not; HIF4_SHARED_VECTORS names the file from elsewhere, e.g. a git worktree).
SHARED_VECTORS = Path(os.environ.get("HIF4_SHARED_VECTORS",
                                     ROOT.parent / "shared" / "hif4_vectors" / "hif4_reference_vectors.npz"))


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.strip().splitlines()]


def test_readme_starts_with_the_demo_and_the_test_command():
    demo, tests = readme_commands()[:2]
    assert demo.endswith("python -m hifloat4 demo")
    assert tests.endswith("python -m pytest -q")


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert readme_commands()[1] in ci.splitlines()
    assert "set -euo pipefail" in ci  # a failing command fails CI


def test_the_vendored_reference_vectors_hold_every_documented_case():
    assert len(vector_cases()) >= 15 and "bf16_inputs" in vector_cases()


@pytest.mark.skipif(not SHARED_VECTORS.is_file(), reason="no shared HiF4 vectors beside this checkout")
def test_the_vendored_reference_vectors_are_the_shared_ones():
    with np.load(VECTORS) as ours, np.load(SHARED_VECTORS) as theirs:
        assert sorted(ours.files) == sorted(theirs.files)
        for k in ours.files:
            assert ours[k].dtype == theirs[k].dtype and ours[k].tobytes() == theirs[k].tobytes(), k


def test_core_imports_without_comfyui():
    code = "import sys, hifloat4; assert not any(m == 'comfy' or m.startswith('comfy.') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# --------------------------------------------------------------------------- Comfy Registry

def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def requirement_names(lines) -> list[str]:
    return [re.split(r"[<>=!~ ;\[]", line.strip(), maxsplit=1)[0].lower() for line in lines]


def test_license_file_is_the_apache_2_text_pyproject_names():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    project = pyproject()["project"]
    assert project["license"] == {"text": "Apache-2.0"}
    assert "License :: OSI Approved :: Apache Software License" in project["classifiers"]


def test_dependencies_are_requirements_txt_without_torch():
    """ComfyUI-Manager installs requirements.txt, the registry reads pyproject: one list.
    Neither may name torch (pip would replace ComfyUI's CUDA build)."""
    reqs = [line for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    deps = pyproject()["project"]["dependencies"]
    assert [r.split("#")[0].strip() for r in reqs] == deps
    assert "torch" not in requirement_names(deps)


def test_ninja_comes_only_with_the_cpu_kernel_extras():
    extras = pyproject()["project"]["optional-dependencies"]
    assert "ninja" not in requirement_names(pyproject()["project"]["dependencies"])
    assert "ninja" in requirement_names(extras["cpu"]) and "ninja" in requirement_names(extras["test"])
    assert readme_commands()[0].split("-e ", 1)[1].startswith('".[cpu]"')  # the CPU demo builds the kernels


def test_registry_metadata_is_complete():
    data = pyproject()
    comfy, project = data["tool"]["comfy"], data["project"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert comfy["requires-comfyui"] == ">=0.3.64"
    repo = project["urls"]["Repository"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repo}/main/"
    assert comfy["Icon"].startswith(prefix) and (ROOT / comfy["Icon"][len(prefix):]).is_file()
    assert any(c.startswith("Operating System ::") for c in project["classifiers"])
    assert any(c.startswith("Environment :: GPU ::") for c in project["classifiers"])  # the registry's accelerator filter
    urls = project["urls"]
    assert urls["Documentation"].startswith(urls["Repository"]) and urls["Issues"] == urls["Repository"] + "/issues"


def test_the_registry_publish_workflow_runs_the_comfy_action_on_a_pyproject_change():
    text = (ROOT / ".github" / "workflows" / "publish.yml").read_text(encoding="utf-8")
    assert "uses: Comfy-Org/publish-node-action@" in text and "secrets.REGISTRY_ACCESS_TOKEN" in text
    assert '"pyproject.toml"' in text.split("paths:", 1)[1].split("\n\n", 1)[0]
