"""What setup.py declares: its floors equal the pins of constraints/minimum.txt, and this
environment satisfies them.

setup.py is read, not run: the keyword arguments of its `setup(...)` call are Python literals.
"""

from __future__ import annotations

import ast
import os
import sys
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_FLOOR = {"gcsfs", "google-cloud-storage"}  # the gcs extra: whatever pip picks


def setup_kwargs() -> dict:
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup"]
    assert len(calls) == 1, "setup.py: one setup(...) call"
    out = {}
    for kw in calls[0].keywords:
        try:
            out[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:  # open("README.md").read() and the like
            pass
    return out


def requirements() -> list[tuple[str, Requirement]]:
    """(where, requirement) for install_requires and every extra."""
    kw = setup_kwargs()
    reqs = [("install_requires", Requirement(r)) for r in kw["install_requires"]]
    for extra, rs in kw["extras_require"].items():
        reqs += [(f"extras_require[{extra!r}]", Requirement(r)) for r in rs]
    return reqs


def floor(req: Requirement) -> str | None:
    lows = [s.version for s in req.specifier if s.operator == ">="]
    assert len(lows) <= 1 and all(s.operator == ">=" for s in req.specifier), f"{req}: one >= floor, no caps"
    return lows[0] if lows else None


def pins() -> dict[str, str]:
    out = {}
    for line in open(os.path.join(ROOT, "constraints", "minimum.txt")):
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints/minimum.txt: {line}: pin with =="
            name = canonicalize_name(req.name)
            assert name not in out, f"constraints/minimum.txt: {req.name} twice"
            out[name] = spec.version
    return out


def test_every_requirement_has_a_floor():
    for where, req in requirements():
        if canonicalize_name(req.name) not in NO_FLOOR:
            assert floor(req) is not None, f"setup.py {where}: {req} has no floor"


def test_floors_equal_the_minimum_constraints():
    pinned = pins()
    floors: dict[str, str] = {}
    for where, req in requirements():
        name, low = canonicalize_name(req.name), floor(req)
        if low is None:
            continue
        assert floors.setdefault(name, low) == low, f"setup.py {where}: {req} vs another floor {floors[name]}"
        assert name in pinned, f"setup.py {where}: {req} is not pinned in constraints/minimum.txt"
        assert Version(pinned[name]) == Version(low), (
            f"setup.py {where}: {req}, constraints/minimum.txt: {name}=={pinned[name]}")
    extra = set(pinned) - set(floors)
    assert not extra, f"constraints/minimum.txt pins what setup.py does not require: {sorted(extra)}"


def test_python_floor():
    spec = SpecifierSet(setup_kwargs()["python_requires"])
    assert Version("3.11") in spec and Version("3.10") not in spec, "jax >= 0.7 needs Python >= 3.11"
    here = ".".join(map(str, sys.version_info[:3]))
    assert Version(here) in spec, f"Python {here} is below python_requires {spec}"


@pytest.mark.parametrize("where", ["install_requires", "extras"])
def test_this_environment_meets_the_floors(where):
    """The library's requirements must be installed and meet their floors; an extra's, when installed."""
    bad = []
    for w, req in requirements():
        if (w == "install_requires") != (where == "install_requires") or floor(req) is None:
            continue
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            if where == "install_requires":
                bad.append(f"{req} ({w}): not installed")
            continue
        if not req.specifier.contains(Version(have).base_version, prereleases=True):
            bad.append(f"{req} ({w}): {have} installed")
    assert not bad, "below setup.py's floors: " + "; ".join(bad)


def test_the_floor_apis_are_there():
    """What sets the floors (CONTRIBUTING.md, "Supported versions") exists here."""
    import jax
    import jaxlib._hlo  # noqa: F401  (animatediff_jax/xla_cost.py)

    assert callable(jax.set_mesh) and callable(jax.shard_map) and jax.sharding.AxisType.Manual
    from jax.experimental import topologies  # noqa: F401
    from orbax.checkpoint._src.path import gcs_utils  # tests/test_remote_paths.py's fake bucket

    assert callable(gcs_utils.get_kvstore_for_gcs)

    grain = pytest.importorskip("grain")
    assert grain.MultiprocessingOptions and grain.experimental.index_shuffle
