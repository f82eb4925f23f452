"""The README's sample output of `examples/quickstart.py` is what the script prints.

The sample was made with the jax, equinox and numpy versions that the README names
as the latest "when last measured"; other versions draw other random numbers, so
the check runs only with those. A failure prints the lines to paste in.
"""

import importlib.metadata
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme() -> str:
    return (ROOT / "README.md").read_text()


def _sample_lines() -> list[str]:
    """The sample output in the README's Quickstart section, up to its `...`."""
    section = _readme().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = section.split("```text\n", 1)[1].split("```", 1)[0]
    lines = block.splitlines()
    return lines[: lines.index("  ...")]


def _measured_versions() -> dict[str, str]:
    found = re.search(
        r"jax ([\d.]+), equinox ([\d.]+)\s+and numpy ([\d.]+) when\s+last\s+measured",
        _readme(),
    )
    assert found, "the README no longer names the versions it was measured with"
    return dict(zip(["jax", "equinox", "numpy"], found.groups(), strict=True))


def test_readme_quickstart_sample_is_what_the_script_prints():
    measured = _measured_versions()
    installed = {name: importlib.metadata.version(name) for name in measured}
    if installed != measured:
        pytest.skip(f"the README's sample is for {measured}; installed: {installed}")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    sample = _sample_lines()
    printed = result.stdout.splitlines()[: len(sample)]
    assert printed == sample, (
        "The README's quickstart sample is stale; replace its first lines with:\n"
        + "\n".join(printed)
    )
