"""apt-layer: atomic, deduplicated ComposeFS images for Debian and Ubuntu."""

#: the version, in this one place: pyproject.toml reads it, debian/changelog must agree
__version__ = "0.1.0"
