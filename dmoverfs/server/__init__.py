"""The dmoverfs server: a data plane in C, a control plane in Python.

The data plane (``csrc/server/transport.c`` with the core, in the extension
``dmoverfs._server``; :mod:`~dmoverfs.server.transport` and
:mod:`~dmoverfs.server.core` are its Python faces) mounts the file system,
owns ``/dev/fuse`` and decides, parks and answers every read, write, poll and
interrupt of a session. The control plane is pyfuse3 on trio
(:mod:`~dmoverfs.server.fs`, :mod:`~dmoverfs.server.device`): lookups, opens,
xattrs, ``stats``, ``func/``, signals, shutdown and plug-in back-ends.
:func:`dmoverfs.server.main.serve` runs both.

Importing this package imports nothing; its modules import pyfuse3 and the
C extension. The CLI's other commands, ``dmoverfs status`` and the client
never import them.
"""
