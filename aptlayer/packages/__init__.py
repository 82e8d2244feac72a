"""Debian packages: dpkg databases, apt and dpkg in a sandbox, bootstraps."""
