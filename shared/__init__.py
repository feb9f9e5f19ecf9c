"""What the gateway and the blockservers must agree on: protocol, records, balancing, model adapters."""

from functools import cache
from importlib.metadata import PackageNotFoundError, version


@cache
def corolla_version() -> str:
    """The installed distribution's version (one home: pyproject.toml)."""
    try:
        return version("corolla")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"
