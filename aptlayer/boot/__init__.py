"""The boot side of a store: what the initramfs chose, boot counting, /etc.

The initramfs script (``aptlayer/data/initramfs-tools/``, POSIX sh) reads
the store's stable boot interface (docs/boot.md) and mounts a deployment as
the root; these modules journal what it did (:mod:`.booted`), mark a boot
complete (:mod:`.counting`) and compare /etc with the image (:mod:`.etc`).
They work through the Store; the CLI only parses and prints.
"""
