"""Debian packages: dpkg databases of trees and images, package diffs, the host's apt
sources, bootstraps, and apt and dpkg in a sandbox around a new root.

This room knows nothing of the journal, the Store or the CLI (tests/test_layers.py
holds it so); the Store and layering call it.
"""
