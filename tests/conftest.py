"""Shared set-up for the suites in this folder: the project root on `sys.path`, and
the hypothesis profiles (`ci` when the `CI` environment variable is set, `dev`
otherwise), which importing `_helpers` registers and loads."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import _helpers  # noqa: E402, F401
