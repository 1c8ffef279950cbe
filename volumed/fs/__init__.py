"""boxvold's own FUSE filesystem: one pyfuse3 mount whose root lists live exports, each a
view of exactly one volume under that export's policy.

Layers, as in virtiofsd: ``passthrough`` (blocking, fd-relative syscalls on one volume),
``views`` (policy wrappers with the same interface: read-only, ownership mapping),
``nodes`` (inode and handle bookkeeping), ``operations`` (the async pyfuse3 edge that maps
errors to errnos once) and ``mount`` (mounting, stale-mount recovery).
"""
