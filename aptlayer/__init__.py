"""apt-layer: atomic, deduplicated ComposeFS images for Debian and Ubuntu."""

__version__ = "0.1.0"
