"""The installed mmbridge version (one place; the package and ``pyproject.toml`` agree)."""

__version__ = "0.1.0"
