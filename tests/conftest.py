"""Shared set-up for the heavier suites in this folder.

Importing the top-level suite registers and loads its hypothesis profiles (`ci` when
the `CI` environment variable is set, `dev` otherwise), so every file here uses them.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import test_lerax_utils  # noqa: E402, F401
