"""The README's shown output is real: every ``<!-- session -->`` block is run against a real
backend and gateway by scripts/readme_session.py, which fails when an output drifts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

SCRIPT = ROOT / "scripts" / "readme_session.py"


@pytest.mark.skipif(
    bool(os.environ.get("GATEWAY_URL")),
    reason="starts its own gateway; test_tutorial.py runs the README's "
    "tutorial against GATEWAY_URL",
)
def test_readme_sessions_print_what_the_readme_shows() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "match" in proc.stdout


def test_the_script_notices_drift(tmp_path) -> None:
    """A README whose shown output differs fails, with a diff naming the command."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import readme_session as rs
    finally:
        sys.path.remove(str(SCRIPT.parent))
    readme = (ROOT / "README.md").read_text()
    blocks = rs.parse(readme)
    assert len(blocks) >= 5 and blocks[0].steps[0].command.startswith("curl ")
    block = blocks[0]
    actual = [rs.Step(s.command, s.output.replace("5000", "4999")) for s in block.steps]
    problems = rs.differences(block, actual)
    assert problems and "X-Men" in problems[0] and "-{" in problems[0]
    # what changes from run to run is not drift
    same = [rs.Step(s.command, s.output.replace("2026", "2031")) for s in block.steps]
    assert rs.differences(block, same) == []


def test_make_help_lists_every_target_the_readme_names() -> None:
    """`make help` is how a newcomer finds targets: it must list each `make X` of the README
    (its pattern once hid k8s-policy and k8s-render, whose names have digits)."""
    import re
    import shutil

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = subprocess.run(
        ["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, timeout=30
    ).stdout
    listed = {line.split()[0] for line in out.splitlines() if line.strip()}
    named = set(
        re.findall(
            r"(?:^|`|or: )make ([a-z][a-z0-9-]*)", (ROOT / "README.md").read_text(), re.MULTILINE
        )
    )
    assert {"k8s-policy", "k8s-render"} <= named
    assert named <= listed, named - listed


def test_rbac_yaml_points_to_readme_headings_that_exist() -> None:
    """The shipped policy's comments name README sections; each must be a real heading."""
    import re

    headings = {
        re.sub(r"[`*]", "", line.lstrip("#").strip())
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.startswith("#")
    }
    comments = "\n".join(
        line
        for line in (ROOT / "rbac.yaml").read_text().splitlines()
        if line.lstrip().startswith("#")
    )
    named = re.findall(r'README, "([^"]+)"', comments)
    assert named, "rbac.yaml no longer names a README section"
    assert set(named) <= headings, set(named) - headings


def test_every_serve_flag_and_its_variable_is_in_the_readme_table() -> None:
    """`serve --help` is the truth: each flag and each [ENV_VAR] it names has a table row."""
    import re

    help_text = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", help_text)) - {"--help"}
    envs = set(re.findall(r"\[(GATEWAY_[A-Z_]+)", help_text))
    assert {"--header-timeout", "--shutdown-grace"} <= flags and "GATEWAY_POOL_SIZE" in envs
    table = "\n".join(
        line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `--")
    )
    missing = [x for x in sorted(flags | envs) if f"`{x}`" not in table]
    assert not missing, f"not in the README's flag table: {missing}"
