"""The composefs format and the kernel.

This layer knows nothing of the journal: it turns trees into images and
images back into trees, keeps a content-addressed digest store, and mounts
images. The upstream C tools are driven from ``upstream.py`` when installed.
"""
