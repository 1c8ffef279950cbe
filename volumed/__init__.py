"""boxvold: the daemon that owns every managed volume and everything exported from it.

This package's top level must stay cheap to import: the ``boxvol`` CLI imports its pure
modules (names, specs, locations, client) on every run, and its start-up time is a target.
"""

__version__ = "0.1.0"
API_VERSION = "v1"
