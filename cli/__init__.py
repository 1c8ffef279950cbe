"""``boxvol``: the command-line front end of boxvold. Thin: it parses, calls the API, prints.

Must stay quick to start: no trio, pydantic, libvirt or pyfuse3 here.
"""
