"""Debian packages: the dpkg database of a tree or an image, and package set diffs.

This room reads roots through the composefs reader and knows nothing of the
journal, the Store or the CLI (tests/test_layers.py holds it so).
"""
