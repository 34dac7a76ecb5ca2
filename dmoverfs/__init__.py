"""dmoverfs: NetBSD's /dev/dmoverio data mover on Linux, as a FUSE file system.

Every ``open()`` of the mount's ``dmoverio`` file is a session; clients write
packed ``struct dmio_usrreq`` and read packed ``struct dmio_usrresp`` back
(see :mod:`dmoverfs.wire`). The bytes are moved by a C core
(:mod:`dmoverfs.core`).
"""

__version__ = "0.1.0"
