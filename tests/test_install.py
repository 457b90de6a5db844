"""The install: no import name of the repo shadows a package of the dependency tree,
and the Hugging Face stack imports in the same process as the project's kernels."""
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _top_level_names(root: Path) -> set[str]:
    """Import names the repo root puts on sys.path: packages and plain modules."""
    names = set()
    for p in root.iterdir():
        if p.suffix == ".py":
            names.add(p.stem)
        elif p.is_dir() and (p / "__init__.py").exists():
            names.add(p.name)
    return names


def test_no_top_level_name_shadows_an_installed_distribution():
    ours = _top_level_names(ROOT) - {"tests", "conftest"}
    theirs = md.packages_distributions()
    clash = sorted(n for n in ours if n in theirs)
    assert "ffviz" in ours and "app" in ours
    assert not clash, f"repo names that shadow installed packages: {clash} ({[theirs[n] for n in clash]})"


def test_huggingface_stack_imports_beside_the_kernels():
    """transformers 5 imports the PyPI ``kernels`` package when its modeling utilities
    load; with the repo root first on sys.path that must still be the PyPI one."""
    pytest.importorskip("transformers")
    pytest.importorskip("diffusers")
    code = ("import sys; sys.path.insert(0, '.')\n"
            "from ffviz import kernels as ours\n"
            "import transformers.modeling_utils\n"
            "from diffusers import WanTransformer3DModel\n"
            "import kernels as hub\n"
            "assert ours.future_score is not None\n"
            "assert 'site-packages' in hub.__file__, hub.__file__\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt pins exact versions only: {line!r}"
            pins[_canonical(name)] = version
    return pins


def _canonical(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def test_every_requirement_is_pinned_within_its_range():
    from packaging.requirements import Requirement
    pins = _pins()
    for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        req = Requirement(line)
        name = _canonical(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt pins {req.name}=={pins[name]} outside requirements.txt's {req.specifier}"


@pytest.mark.skipif(sys.platform != "linux", reason="the pins are those of the Linux CI")
def test_ci_installs_the_pinned_versions():
    """What .ci/run installs is what constraints.txt says (a drift means the install
    line lost its ``-c constraints.txt``)."""
    import os
    if os.environ.get("CI") != "true":
        pytest.skip("only CI's fresh venv is installed from constraints.txt by construction")
    pins = _pins()
    off = {}
    for dist in md.distributions():
        name = _canonical(dist.metadata["Name"])
        if name in pins and dist.version.split("+")[0] != pins[name]:
            off[name] = (dist.version, pins[name])
    assert not off, f"installed vs pinned: {off}"
