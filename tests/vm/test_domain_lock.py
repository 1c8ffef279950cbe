"""Changes to one domain by several ``boxvol vm`` processes at once: each holds the domain's
change lock (vmdriver/locks.py) from reading its definition to writing it back, so none is
lost, and one that cannot get the lock fails cleanly, changing nothing. Real libvirtd and
boxvold; no guest is booted (boot-time attachments only)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.vm.helpers import INACTIVE, URI, Domains, TestDomain
from vmdriver import domain_xml as dx
from vmdriver.backends.libvirt import LibvirtDriver
from vmdriver.driver import DomainBusy
from vmdriver.locks import domain_lock
from volumed.client import Client


def recorded(domain: TestDomain) -> set[str]:
    return {r.guest_path for r in dx.attachment_records(domain.dom.XMLDesc(INACTIVE))}


def test_concurrent_attaches_to_one_domain_all_land(
    domains: Domains, client: Client, tmp_path: Path
) -> None:
    guest = domains.define(script="true")
    paths = [f"/d{i}" for i in range(8)]
    errors: list[BaseException] = []

    def attach(path: str) -> None:
        # One driver (one libvirt connection) each, as separate processes would have.
        try:
            with LibvirtDriver(client, URI, lock_dir=str(tmp_path)) as driver:
                driver.attach(guest.name, [f"vol{path[2:]}:{path}"])
        except BaseException as exc:
            errors.append(exc)

    with LibvirtDriver(client, URI, lock_dir=str(tmp_path)) as driver:
        driver.prepare(guest.name)
        threads = [threading.Thread(target=attach, args=(p,)) for p in paths]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        assert recorded(guest) == set(paths)
        assert {a.guest_path for a in driver.list_attachments(guest.name)} == set(paths)
        config = guest.dom.XMLDesc(INACTIVE)
        assert len(dx.filesystem_tags(config)) == len(paths)
        assert all(f":{p}" in config for p in paths), config
        driver.detach(guest.name)
    assert client.list_exports() == []


def test_a_domain_held_by_another_command_is_refused_unchanged(
    domains: Domains, client: Client, tmp_path: Path
) -> None:
    guest = domains.define(script="true")
    with LibvirtDriver(client, URI, lock_dir=str(tmp_path)) as driver:
        driver.prepare(guest.name)
        before = guest.dom.XMLDesc(INACTIVE)
        with domain_lock(str(tmp_path), guest.dom.UUIDString(), guest.name):
            with (
                pytest.raises(DomainBusy, match=f"domain {guest.name} is being changed by pid "),
                domain_lock(str(tmp_path), guest.dom.UUIDString(), guest.name, wait=0.2),
            ):
                pass
            with (
                LibvirtDriver(client, URI, lock_dir=str(tmp_path), lock_wait=0.2) as impatient,
                pytest.raises(DomainBusy, match="try again once it has finished"),
            ):
                impatient.attach(guest.name, ["busy:/data"])
        assert guest.dom.XMLDesc(INACTIVE) == before
        assert client.list_exports() == []
        # Free again: the same attach goes through.
        [attached] = driver.attach(guest.name, ["busy:/data"])
        assert attached.guest_path == "/data"
        driver.detach(guest.name)
