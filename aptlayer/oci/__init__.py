"""OCI images: an apt-layer image as tar layers chunked by Debian package, and back.

* :mod:`.layout`: the OCI image layout on disk (``oci-layout``, ``index.json``,
  ``blobs/sha256/``), read and written natively;
* :mod:`.tarlayer`: a layer's tar stream from entries of a tree, and the
  entries of a layer applied to a tree (OCI whiteouts);
* :mod:`.chunking`: which layer each path of an image goes to, by package;
* :mod:`.transport`: registries, through skopeo, to and from a layout;
* :mod:`.distribute`: push and pull through the Store.

A room of its own: it reads images through composefs and packages, and
records through the Store; nothing below imports it.
"""
