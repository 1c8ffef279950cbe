"""vmdriver: attaches boxvold's exports to VMs through a VMM backend (libvirt first).

It talks to boxvold's API and to the VMM; boxvold never imports it.
"""
