"""The installed package's version, for `--version`, output metadata and the server's info."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    try:
        return version("optimal-sampling")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"
