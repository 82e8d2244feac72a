"""Generic Linux: file operations on directory fds, fs-verity ioctls, the mount API,
loop devices, mountinfo, a forked helper process.

Nothing here knows apt-layer's store, composefs or the journal: this package
imports nothing else of ``aptlayer`` (``tests/test_layers.py`` checks it), so
any layer may use it.
"""
