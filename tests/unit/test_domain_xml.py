"""vmdriver.domain_xml: golden-file tests of the pure domain XML functions.

The goldens are inline: each is the exact string a function must return, so a change in the
XML vmdriver writes shows up as a diff here. That the same XML is accepted by libvirt is
checked in tests/vm, which defines it on a real connection.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from vmdriver import domain_xml as dx
from volumed.errors import InvalidArgument

# What `virsh dumpxml --inactive` gives for a q35 domain, trimmed, plus things vmdriver does
# not model and must leave alone: a comment, other applications' metadata, a vendor
# attribute, an unknown element, QEMU passthrough arguments and a device behind root port 1.
LIBVIRT_Q35 = """\
<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>guest</name>
  <uuid>5f0c3a96-0d39-4f53-a1a9-1f0e8e2c7f31</uuid>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://debian.org/debian/12"/>
    </libosinfo:libosinfo>
  </metadata>
  <memory unit='KiB'>262144</memory>
  <currentMemory unit='KiB'>262144</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <kernel>/var/cache/boxvol-guest/vmlinux</kernel>
    <cmdline>console=ttyS0 panic=-1</cmdline>
  </os>
  <vendor:extension xmlns:vendor='http://vendor.example/x' level='3'/>
  <devices>
    <!-- keep me -->
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='pci' index='0' model='pcie-root'/>
    <controller type='pci' index='1' model='pcie-root-port'>
      <model name='pcie-root-port'/>
      <target chassis='1' port='0x10'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>
    </controller>
    <controller type='pci' index='2' model='pcie-root-port'>
      <model name='pcie-root-port'/>
      <target chassis='2' port='0x11'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x1'/>
    </controller>
    <interface type='network' frobnicate='yes'>
      <source network='default'/>
      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>
    </interface>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-no-reboot'/>
  </qemu:commandline>
</domain>
"""

# prepare(LIBVIRT_Q35, spare_root_ports=2): shared memfd memory beside the sizes; one root
# port is used (bus 0x01), one is spare, so one is added after the other controllers. All
# else is as it came (ElementTree writes double quotes and ' />').
GOLDEN_PREPARED = """\
<domain xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0" \
xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0" \
xmlns:vendor="http://vendor.example/x" type="qemu">
  <name>guest</name>
  <uuid>5f0c3a96-0d39-4f53-a1a9-1f0e8e2c7f31</uuid>
  <metadata>
    <libosinfo:libosinfo>
      <libosinfo:os id="http://debian.org/debian/12" />
    </libosinfo:libosinfo>
  </metadata>
  <memory unit="KiB">262144</memory>
  <currentMemory unit="KiB">262144</currentMemory>
  <memoryBacking>
    <source type="memfd" />
    <access mode="shared" />
  </memoryBacking>
  <vcpu placement="static">1</vcpu>
  <os>
    <type arch="x86_64" machine="pc-q35-7.2">hvm</type>
    <kernel>/var/cache/boxvol-guest/vmlinux</kernel>
    <cmdline>console=ttyS0 panic=-1</cmdline>
  </os>
  <vendor:extension level="3" />
  <devices>
    <!-- keep me -->
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type="pci" index="0" model="pcie-root" />
    <controller type="pci" index="1" model="pcie-root-port">
      <model name="pcie-root-port" />
      <target chassis="1" port="0x10" />
      <address type="pci" domain="0x0000" bus="0x00" slot="0x02" function="0x0" />
    </controller>
    <controller type="pci" index="2" model="pcie-root-port">
      <model name="pcie-root-port" />
      <target chassis="2" port="0x11" />
      <address type="pci" domain="0x0000" bus="0x00" slot="0x02" function="0x1" />
    </controller>
    <controller type="pci" model="pcie-root-port" />
    <interface type="network" frobnicate="yes">
      <source network="default" />
      <address type="pci" domain="0x0000" bus="0x01" slot="0x00" function="0x0" />
    </interface>
    <memballoon model="none" />
  </devices>
  <qemu:commandline>
    <qemu:arg value="-no-reboot" />
  </qemu:commandline>
</domain>"""

MINIMAL_Q35 = """\
<domain type="qemu">
  <name>t</name>
  <memory unit="MiB">256</memory>
  <os>
    <type arch="x86_64" machine="q35">hvm</type>
  </os>
  <devices>
    <memballoon model="none" />
  </devices>
</domain>"""

# No pcie-root yet (a hand-written definition): one is added at index 0 first, or libvirt
# would number the first root port 0 and refuse the domain.
GOLDEN_MINIMAL_PREPARED = """\
<domain type="qemu">
  <name>t</name>
  <memory unit="MiB">256</memory>
  <memoryBacking>
    <source type="memfd" />
    <access mode="shared" />
  </memoryBacking>
  <os>
    <type arch="x86_64" machine="q35">hvm</type>
  </os>
  <devices>
    <memballoon model="none" />
    <controller type="pci" index="0" model="pcie-root" />
    <controller type="pci" model="pcie-root-port" />
    <controller type="pci" model="pcie-root-port" />
  </devices>
</domain>"""

GOLDEN_FILESYSTEM = """\
<filesystem type="mount">
  <driver type="virtiofs" queue="1024" />
  <source socket="/run/boxvol/vhost/01J0EXPORT.sock" />
  <target dir="bv-data" />
  <alias name="ua-boxvol-bv-data" />
</filesystem>"""


def canonical(xml: str) -> str:
    """C14N 2.0 without insignificant whitespace: equal iff the documents mean the same."""
    return ET.canonicalize(xml, strip_text=True)


def elements(xml: str) -> list[tuple[str, tuple[tuple[str, str], ...], str]]:
    """Every element as (tag with namespace, sorted attributes, stripped text)."""
    root = ET.fromstring(xml)
    return [
        (str(e.tag), tuple(sorted(e.attrib.items())), (e.text or "").strip()) for e in root.iter()
    ]


# -- prepare ------------------------------------------------------------------------------


def test_prepare_golden() -> None:
    result = dx.prepare_domain(LIBVIRT_Q35, spare_root_ports=2)
    assert result.xml == GOLDEN_PREPARED
    assert result.changes == (
        "added <memoryBacking>",
        "memory backing source: memfd",
        "memory access: shared (virtiofsd maps guest RAM)",
        "added 1 pcie-root-port controller(s) for hot-plug",
    )


def test_prepare_keeps_everything_it_does_not_model() -> None:
    before = elements(LIBVIRT_Q35)
    after = elements(dx.prepare(LIBVIRT_Q35, spare_root_ports=2))
    # Every element of the input is still there, with its attributes and text, in order.
    remaining = iter(after)
    for element in before:
        assert element in remaining, element
    added = [e for e in after if e not in before]
    assert [e[0] for e in added] == ["memoryBacking", "source", "access", "controller"]
    assert "<!-- keep me -->" in dx.prepare(LIBVIRT_Q35)
    assert 'xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0"' in dx.prepare(LIBVIRT_Q35)


def test_prepare_is_idempotent() -> None:
    once = dx.prepare(LIBVIRT_Q35)
    twice = dx.prepare_domain(once)
    assert twice.changes == ()
    assert twice.xml is once  # nothing to change: the very same string comes back


def test_prepare_minimal_q35_golden() -> None:
    assert dx.prepare(MINIMAL_Q35, spare_root_ports=2) == GOLDEN_MINIMAL_PREPARED
    assert dx.prepare(GOLDEN_MINIMAL_PREPARED, spare_root_ports=2) is GOLDEN_MINIMAL_PREPARED


def test_prepare_counts_only_free_root_ports() -> None:
    # Both ports in use: two more are needed for two spares.
    xml = LIBVIRT_Q35.replace(
        "<memballoon model='none'/>",
        "<disk><address type='pci' domain='0x0000' bus='0x02' slot='0x00'/></disk>"
        "<memballoon model='none'/>",
    )
    assert dx.prepare_domain(xml, spare_root_ports=2).changes[-1] == (
        "added 2 pcie-root-port controller(s) for hot-plug"
    )


def test_prepare_keeps_other_memory_backing_children() -> None:
    xml = LIBVIRT_Q35.replace(
        "<vcpu",
        "<memoryBacking><hugepages/><source type='anonymous'/><locked/></memoryBacking><vcpu",
    )
    out = ET.fromstring(dx.prepare(xml))
    backing = out.find("memoryBacking")
    assert backing is not None
    assert [c.tag for c in backing] == ["hugepages", "source", "locked", "access"]
    source, access = backing.find("source"), backing.find("access")
    assert source is not None and source.get("type") == "memfd"
    assert access is not None and access.get("mode") == "shared"
    assert len(out.findall("memoryBacking")) == 1


def test_prepare_keeps_a_file_backed_source() -> None:
    xml = MINIMAL_Q35.replace("<os>", "<memoryBacking><source type='file'/></memoryBacking><os>")
    out = dx.prepare_domain(xml, spare_root_ports=0)
    assert out.changes == ("memory access: shared (virtiofsd maps guest RAM)",)
    assert '<source type="file" />' in out.xml


def test_prepare_pc_machine_gets_no_root_ports() -> None:
    xml = MINIMAL_Q35.replace('machine="q35"', 'machine="pc-i440fx-7.2"')
    out = dx.prepare(xml)
    assert "pcie-root-port" not in out
    assert dx.has_shared_memory(out)


def test_shared_memory_through_numa_cells() -> None:
    numa = "<cpu><numa><cell id='0' cpus='0' memory='262144' memAccess='shared'/></numa></cpu>"
    xml = MINIMAL_Q35.replace("<os>", numa + "<os>")
    assert dx.has_shared_memory(xml)
    assert dx.prepare_domain(xml, spare_root_ports=0).changes == ()
    assert not dx.has_shared_memory(MINIMAL_Q35)


def test_prepare_refuses_malformed_xml() -> None:
    with pytest.raises(InvalidArgument, match="not well-formed"):
        dx.prepare("<domain><name>x</domain>")


# -- filesystem devices -------------------------------------------------------------------


def test_filesystem_device_golden() -> None:
    assert dx.filesystem_device("/run/boxvol/vhost/01J0EXPORT.sock", "bv-data") == (
        GOLDEN_FILESYSTEM
    )


def test_filesystem_device_refuses_bad_tags_and_aliases() -> None:
    with pytest.raises(InvalidArgument, match="tag"):
        dx.filesystem_device("/s.sock", "has space")
    with pytest.raises(InvalidArgument, match="alias"):
        dx.filesystem_device("/s.sock", "ok", alias="boxvol-no-ua-prefix")
    with pytest.raises(InvalidArgument, match="alias"):
        dx.filesystem_device("/s.sock", "ok", alias="ua-dots.not.allowed")


def test_filesystems_parsed_back() -> None:
    live = GOLDEN_PREPARED.replace(
        "<memballoon",
        GOLDEN_FILESYSTEM
        + "<filesystem type='mount' accessmode='passthrough'><driver type='path'/>"
        "<source dir='/srv'/><target dir='ninep'/></filesystem>"
        "<filesystem type='mount'><driver type='virtiofs'/><source socket='/x.sock'/>"
        "<target dir='theirs'/><alias name='fs1'/></filesystem><memballoon",
    )
    found = dx.filesystems(live)
    assert [(f.tag, f.socket, f.alias, f.managed) for f in found] == [
        ("bv-data", "/run/boxvol/vhost/01J0EXPORT.sock", "ua-boxvol-bv-data", True),
        ("theirs", "/x.sock", "fs1", False),
    ]
    assert found[0].xml == GOLDEN_FILESYSTEM
    assert [f.tag for f in dx.boxvol_filesystems(live)] == ["bv-data"]
    assert dx.filesystem_tags(live) == {"bv-data", "ninep", "theirs"}


# -- tags ---------------------------------------------------------------------------------


def test_tag_rules() -> None:
    assert dx.check_tag("a" * 36) == "a" * 36
    for bad in ("", "a" * 37, "sp ace", "slash/", "colon:", "é"):
        with pytest.raises(InvalidArgument):
            dx.check_tag(bad)


def test_derived_tags() -> None:
    volume_id = "01J0ABCDEFGHJKMNPQRSTVWXYZ"
    assert dx.derive_tag("data", volume_id) == "bv-data"
    assert dx.derive_tag(None, volume_id) == "bv-01j0abcdef"
    long = dx.derive_tag("x" * 64, volume_id)
    assert long == "bv-" + "x" * 33 and len(long.encode()) == dx.TAG_MAX_BYTES


def test_derived_tags_are_unique_and_short() -> None:
    volume_id = "01J0ABCDEFGHJKMNPQRSTVWXYZ"
    taken: set[str] = set()
    tags = []
    for _ in range(12):
        tag = dx.derive_tag("y" * 64, volume_id, taken)
        dx.check_tag(tag)
        taken.add(tag)
        tags.append(tag)
    assert len(set(tags)) == 12
    assert tags[1] == "bv-" + "y" * 31 + "-2"
    assert tags[11] == "bv-" + "y" * 30 + "-12"
    assert all(len(t.encode()) <= dx.TAG_MAX_BYTES for t in tags)
    # Case-insensitively unique: a listing never shows two tags differing only by case.
    assert dx.derive_tag("Data", volume_id, {"bv-data"}) == "bv-Data-2"


def test_aliases_are_distinct_for_distinct_tags() -> None:
    tags = ["a.b", "a_b", "a-b", "a_db", "a_ub", "a__b"]
    aliases = [dx.alias_for_tag(t) for t in tags]
    assert len(set(aliases)) == len(tags)
    assert dx.alias_for_tag("bv-data") == "ua-boxvol-bv-data"
    assert dx.alias_for_tag("a.b") == "ua-boxvol-a_db"


# -- metadata -----------------------------------------------------------------------------

RECORDS = [
    dx.AttachmentRecord(
        tag="bv-data",
        guest_path="/data",
        read_only=False,
        export_id="01J0EXPORT",
        volume_id="01J0VOLUME",
        volume_name="data",
        via="direct",
        alias="ua-boxvol-bv-data",
    ),
    dx.AttachmentRecord(
        tag="bv-01j0abcdef",
        guest_path="/scratch",
        read_only=True,
        export_id="01J0EXPORT2",
        volume_id="01J0ABCDEFGHJKMNPQRSTVWXYZ",
        volume_name=None,
        via="fuse",
        alias="ua-boxvol-bv-01j0abcdef",
    ),
]

GOLDEN_METADATA = """\
<attachments>
  <attachment tag="bv-data" guest-path="/data" mode="rw" export="01J0EXPORT" \
volume="01J0VOLUME" via="direct" alias="ua-boxvol-bv-data" volume-name="data" />
  <attachment tag="bv-01j0abcdef" guest-path="/scratch" mode="ro" export="01J0EXPORT2" \
volume="01J0ABCDEFGHJKMNPQRSTVWXYZ" via="fuse" alias="ua-boxvol-bv-01j0abcdef" />
</attachments>"""


def test_metadata_golden_and_round_trip() -> None:
    element = dx.metadata_element(RECORDS)
    assert element == GOLDEN_METADATA
    assert dx.parse_metadata_element(element) == RECORDS
    # As libvirt stores it inside the domain: in our namespace, under <metadata>.
    stored = element.replace("<attachments>", f'<boxvol:attachments xmlns:boxvol="{dx.NS}">')
    stored = stored.replace("<attachment ", "<boxvol:attachment ")
    stored = stored.replace("</attachments>", "</boxvol:attachments>")
    domain = LIBVIRT_Q35.replace("</metadata>", stored + "</metadata>")
    assert dx.attachment_records(domain) == RECORDS
    assert dx.attachment_records(LIBVIRT_Q35) == []
    assert dx.parse_metadata_element(None) == []


def test_metadata_ignores_damaged_records() -> None:
    assert dx.parse_metadata_element("<attachments><attachment tag='x'/></attachments>") == []


# -- kernel command line ------------------------------------------------------------------


def test_cmdline_add_and_remove() -> None:
    data = dx.MountWord("bv-data", "/data")
    scratch = dx.MountWord("bv-s", "/mnt/s", read_only=True)
    xml = dx.update_cmdline(LIBVIRT_Q35, add=[data, scratch])
    assert dx.cmdline(xml) == (
        "console=ttyS0 panic=-1 boxvol.mount=bv-data:/data boxvol.mount=bv-s:/mnt/s:ro"
    )
    assert dx.mount_words(dx.cmdline(xml)) == [data, scratch]
    # Re-adding is idempotent; removing leaves every other word where it was.
    assert dx.update_cmdline(xml, add=[scratch]) == xml
    removed = dx.update_cmdline(xml, remove_tags=["bv-data"])
    assert dx.cmdline(removed) == "console=ttyS0 panic=-1 boxvol.mount=bv-s:/mnt/s:ro"
    assert dx.update_cmdline(removed, remove_tags=["bv-data"]) is removed
    # Only the command line changed.
    blank = dx.cmdline(removed)
    assert canonical(removed.replace(blank, "X")) == canonical(
        LIBVIRT_Q35.replace("console=ttyS0 panic=-1", "X")
    )


def test_cmdline_words_in_the_middle() -> None:
    text = "a boxvol.mount=t1:/x  b\tboxvol.mount=t2:/y:ro c"
    assert dx.edit_mount_words(text, remove_tags=["t1"]) == "a  b\tboxvol.mount=t2:/y:ro c"
    assert dx.edit_mount_words(text, remove_tags=["t1", "t2"]) == "a  b c"
    assert dx.edit_mount_words(text) is text


def test_cmdline_only_for_direct_kernel_boot() -> None:
    assert dx.has_direct_kernel_boot(LIBVIRT_Q35)
    assert not dx.has_direct_kernel_boot(MINIMAL_Q35)
    assert dx.update_cmdline(MINIMAL_Q35, add=[dx.MountWord("t", "/d")]) is MINIMAL_Q35
    no_cmdline = LIBVIRT_Q35.replace("<cmdline>console=ttyS0 panic=-1</cmdline>", "")
    added = dx.update_cmdline(no_cmdline, add=[dx.MountWord("t", "/d")])
    assert dx.cmdline(added) == "boxvol.mount=t:/d"


def test_cmdline_paths_the_guest_cannot_mount_are_refused() -> None:
    for bad in ("/with space", "/proc/x", "/dev", "/", "/a/../b", "relative", "/semi;colon"):
        with pytest.raises(InvalidArgument, match="kernel command line"):
            dx.update_cmdline(LIBVIRT_Q35, add=[dx.MountWord("t", bad)])


def test_cmdline_length_limit() -> None:
    many = [dx.MountWord(f"t{i}", "/" + "p" * 60 + str(i)) for i in range(40)]
    with pytest.raises(InvalidArgument, match="2047"):
        dx.update_cmdline(LIBVIRT_Q35, add=many)
