"""Reproducible installs: pyproject.toml's ranges and constraints.txt's exact versions (what CI runs) agree."""

from __future__ import annotations

import importlib.metadata as md
import shutil
import subprocess

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (CI runs 3.11)

PYPROJECT = REPO / "pyproject.toml"
CONSTRAINTS = REPO / "constraints.txt"
# the extras `make install` installs (dev holds wandb's and export's packages); deepspeed is opt-in and unpinned
INSTALLED_EXTRAS = ("dev",)


def project() -> dict:
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]


def requirements(groups: tuple[str, ...] | None = None) -> list[tuple[str, Requirement]]:
    """(group, requirement) for [project] dependencies and the named optional-dependencies (all when None)."""
    proj = project()
    out = [("dependencies", Requirement(r)) for r in proj["dependencies"]]
    for extra, reqs in proj.get("optional-dependencies", {}).items():
        if groups is None or extra in groups:
            out += [(f"optional-dependencies.{extra}", Requirement(r)) for r in reqs]
    return out


def parse_constraints(text: str) -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", (
            f"constraints.txt:{number}: not name==version: {raw!r}"
        )
        assert req.marker is None and not req.extras, f"constraints.txt:{number}: markers/extras: {raw!r}"
        name = canonicalize_name(req.name)
        assert name not in pins, f"constraints.txt:{number}: {req.name} pinned twice"
        pins[name] = Version(specs[0].version)
    return pins


def pins() -> dict[str, Version]:
    return parse_constraints(CONSTRAINTS.read_text(encoding="utf-8"))


def has_upper_bound(spec: SpecifierSet) -> bool:
    return any(s.operator in {"<", "<=", "==", "~=", "==="} for s in spec)


def out_of_bounds(pinned: dict[str, Version], reqs: list[tuple[str, Requirement]]) -> list[str]:
    """Every requirement pinned, and each pin inside the requirement's range."""
    problems = []
    for group, req in reqs:
        name = canonicalize_name(req.name)
        if name not in pinned:
            problems.append(f"{req.name} ({group}) is not pinned in constraints.txt")
        elif not req.specifier.contains(pinned[name], prereleases=True):
            problems.append(
                f"{req.name}=={pinned[name]} is outside pyproject's {group} range {req.specifier}"
            )
    return problems


def test_every_pyproject_requirement_has_an_upper_bound():
    missing = [f"{req} ({group})" for group, req in requirements() if not has_upper_bound(req.specifier)]
    assert not missing, f"no upper bound (add <NEXT_MAJOR): {missing}"


def test_upper_bound_check_catches_an_open_range():
    assert not has_upper_bound(SpecifierSet(">=4.56"))
    assert not has_upper_bound(SpecifierSet(""))
    assert has_upper_bound(SpecifierSet(">=4.56,<6"))


def test_constraints_pin_every_installed_requirement_within_its_range():
    assert not out_of_bounds(pins(), requirements(INSTALLED_EXTRAS))


def test_pins_of_the_optional_extras_are_within_range():
    """An extra that `make install` doesn't install (deepspeed) need not be pinned, but a pin must fit."""
    pinned = pins()
    reqs = [(g, r) for g, r in requirements() if canonicalize_name(r.name) in pinned]
    assert not out_of_bounds(pinned, reqs)


def test_bounds_check_catches_disagreement():
    reqs = [
        ("dependencies", Requirement("transformers>=4.56,<6")),
        ("optional-dependencies.dev", Requirement("ruff>=0.5,<1")),
    ]
    assert out_of_bounds({"transformers": Version("5.24.0"), "ruff": Version("0.17.6")}, reqs) == []
    problems = out_of_bounds({"transformers": Version("6.0.0")}, reqs)
    assert len(problems) == 2
    assert "outside" in problems[0] and "transformers" in problems[0]
    assert "ruff" in problems[1] and "not pinned" in problems[1]


def test_constraints_file_is_exact_and_portable():
    pinned = pins()
    assert "wronai" not in pinned, (
        "constraints.txt pins wronai itself (drop the editable line from pip freeze)"
    )
    local = [f"{n}=={v}" for n, v in pinned.items() if v.local]
    assert not local, f"local version labels only exist on one index, pin the public version: {local}"
    assert pinned.get("torch") == Version("2.13.0"), "torch stays pinned to the CPU build on this disk"
    with pytest.raises(AssertionError, match="not name==version"):
        parse_constraints("torch>=2.4\n")
    with pytest.raises(AssertionError, match="pinned twice"):
        parse_constraints("PyYAML==6.0.4\npyyaml==6.0.4\n")


def test_installed_environment_matches_the_constraints():
    """The environment running the tests is the pinned one (a fresh `make install` gives exactly this)."""
    pinned = pins()
    try:
        wronai = md.distribution("wronai")
    except md.PackageNotFoundError:
        pytest.skip("wronai is not installed (run `make install`)")
    closure: set[str] = set()
    todo: list[tuple[md.Distribution, set[str]]] = [(wronai, set(INSTALLED_EXTRAS))]
    while todo:
        dist, extras = todo.pop()
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras or {""}):
                continue
            name = canonicalize_name(req.name)
            if name in closure:
                continue
            closure.add(name)
            try:
                todo.append((md.distribution(name), set(req.extras)))
            except md.PackageNotFoundError:
                continue  # reported below as not installed
    closure.discard("setuptools")  # pip freeze leaves it out; it comes with the venv
    unpinned = sorted(closure - pinned.keys())
    assert not unpinned, f"installed through wronai[dev] but not pinned in constraints.txt: {unpinned}"
    drift = []
    for name in sorted(closure):
        try:
            installed = Version(md.version(name))
        except md.PackageNotFoundError:
            drift.append(f"{name}: not installed")
            continue
        if installed.public != pinned[name].public:
            drift.append(f"{name}: installed {installed}, constraints.txt {pinned[name]}")
    assert not drift, (
        f"this environment is not the pinned one (`make install`, or update constraints.txt): {drift}"
    )


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_install_uses_the_constraints(tmp_path):
    dry = subprocess.run(
        ["make", "-n", "-B", "install", f"VENV={tmp_path / 'venv'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pip_lines = [line for line in dry.splitlines() if "pip install" in line]
    wronai_line = [line for line in pip_lines if '-e ".[dev]"' in line]
    assert wronai_line and "-c constraints.txt" in wronai_line[0], dry
    torch_line = [line for line in pip_lines if "torch==" in line]
    assert torch_line and f'"torch=={pins()["torch"]}"' in torch_line[0], dry


def test_the_c_kernel_sources_ship_in_the_package():
    """The compiled kernels are built from their C source on the user's machine: every ``.c`` file under
    ``wronai/kernels/native`` must match a package-data pattern, or a wheel install has no source to build."""
    from fnmatch import fnmatch

    patterns = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["tool"]["setuptools"]["package-data"][
        "wronai"
    ]
    package = REPO / "src" / "wronai"
    sources = sorted(p.relative_to(package).as_posix() for p in (package / "kernels" / "native").glob("*.c"))
    assert sources, "no C sources found"
    for source in sources:
        assert any(fnmatch(source, pattern) for pattern in patterns), source
