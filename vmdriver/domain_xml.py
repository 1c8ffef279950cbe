"""libvirt domain XML as vmdriver reads and edits it: pure functions on strings.

What it owns: making a domain able to take virtio-fs (``prepare``), the ``<filesystem>``
element of one attachment, reading attached filesystems back, the virtio-fs tag rules, the
attachment records vmdriver keeps in the domain's ``<metadata>``, and the kernel command line
words (``boxvol.mount=TAG:/path[:ro]``) through which the test guest learns its mount points.

Edits are surgical, as virt-manager's virtinst does them: the document is parsed once, only the
elements a function is about are touched, and everything it does not model (unknown elements,
attributes, comments, other applications' metadata and their namespace prefixes) is written back
as it came. A function that has nothing to change returns its input string unchanged, so every
edit here is idempotent and a no-op is byte-for-byte a no-op.

Must not import libvirt, trio or anything that does I/O: it is checked by golden-file tests and
used by the libvirt driver, which is the only place XML meets a hypervisor.
"""

from __future__ import annotations

import copy
import re
import xml.etree.ElementTree as ET
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from volumed.errors import InvalidArgument

#: The XML namespace of vmdriver's ``<metadata>`` element (libvirt keys metadata by namespace).
NS = "https://boxvol.example/ns/1"
#: The prefix libvirt writes for it (``setMetadata``'s ``key``).
NS_PREFIX = "boxvol"
#: libvirt only keeps aliases a user chose if they start with ``ua-``; ours add ``boxvol-`` so
#: DEVICE_REMOVED events and parsed devices can be told apart from everyone else's.
ALIAS_PREFIX = "ua-boxvol-"
#: virtio-fs carries the tag in a 36-byte config field (virtio spec 5.11.4).
TAG_MAX_BYTES = 36
TAG_CHARS = "A-Za-z0-9._-"
TAG_RULE = f"a virtio-fs tag is 1 to {TAG_MAX_BYTES} characters of letters, digits, '.', '_', '-'"
_TAG = re.compile(rf"[{TAG_CHARS}]{{1,{TAG_MAX_BYTES}}}\Z")
_NOT_TAG_CHAR = re.compile(rf"[^{TAG_CHARS}]")
#: Characters libvirt accepts in a user alias (``ua-`` + these).
_ALIAS_CHARS = re.compile(r"[A-Za-z0-9_-]+\Z")
#: The test guest's init accepts only these in a mount path (guest/init: valid_path_chars).
_CMDLINE_PATH = re.compile(r"/[A-Za-z0-9._/-]*\Z")
_RESERVED_GUEST_PATHS = ("/proc", "/sys", "/dev")
#: x86 kernels take at most 2047 bytes of command line; longer ones are cut silently.
CMDLINE_MAX_BYTES = 2047
MOUNT_WORD = "boxvol.mount="
#: Spare ``pcie-root-port`` controllers ``prepare`` keeps on q35 machines: each hot-plugged
#: PCI device (a virtio-fs device is one) needs a free port, and ports cannot be added live.
DEFAULT_SPARE_ROOT_PORTS = 4


# -- parsing and writing back -------------------------------------------------------------


class _Builder(ET.TreeBuilder):
    """A TreeBuilder that keeps comments and processing instructions and remembers the
    namespace prefixes the document declared, so they can be written back as they were."""

    def __init__(self) -> None:
        super().__init__(insert_comments=True, insert_pis=True)
        self.prefixes: list[tuple[str, str]] = []

    def start_ns(self, prefix: str, uri: str) -> None:
        self.prefixes.append((prefix, uri))


@dataclass
class _Doc:
    root: ET.Element
    prefixes: list[tuple[str, str]]


def _parse(xml: str) -> _Doc:
    builder = _Builder()
    parser = ET.XMLParser(target=builder)
    try:
        parser.feed(xml)
        root = parser.close()
    except ET.ParseError as exc:
        raise InvalidArgument(f"the domain XML is not well-formed: {exc}") from None
    return _Doc(root, builder.prefixes)


def _write(doc: _Doc) -> str:
    for prefix, uri in [(NS_PREFIX, NS), *doc.prefixes]:
        # ElementTree writes the prefixes it knows; this keeps ``qemu:``, ``libosinfo:`` and
        # ours instead of ``ns0:``. (A process-wide table; the mapping registered is the
        # document's own, so registering it again is harmless.) ``ns<N>`` is reserved.
        if prefix and not re.fullmatch(r"ns\d+", prefix):
            ET.register_namespace(prefix, uri)
    return ET.tostring(doc.root, encoding="unicode")


def _indent_unit(root: ET.Element) -> str:
    text = root.text or ""
    if text.startswith("\n") and text.strip(" \t\n") == "":
        unit = text[1:]
        if unit:
            return unit
    return "  "


def _depth(root: ET.Element, target: ET.Element) -> int:
    def walk(node: ET.Element, level: int) -> int | None:
        if node is target:
            return level
        for child in node:
            found = walk(child, level + 1)
            if found is not None:
                return found
        return None

    found = walk(root, 0)
    if found is None:
        raise ValueError("element is not in this document")
    return found


def _insert(
    root: ET.Element, parent: ET.Element, child: ET.Element, index: int | None = None
) -> None:
    """Insert ``child`` into ``parent`` with whitespace matching its new siblings, so the
    document reads as if libvirt had written it and a diff shows only the new lines."""
    unit = _indent_unit(root)
    level = _depth(root, parent) + 1
    if len(child):
        ET.indent(child, space=unit, level=level)
    inner = "\n" + unit * level
    outer = "\n" + unit * (level - 1)
    children = list(parent)
    if not children:
        parent.text = inner
        child.tail = outer
        parent.append(child)
        return
    if index is None or index >= len(children):
        last = children[-1]
        child.tail = last.tail if last.tail is not None else outer
        last.tail = inner
        parent.append(child)
    else:
        child.tail = inner
        parent.insert(index, child)


# -- prepare ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prepared:
    """The outcome of ``prepare_domain``: the XML and what changed in it (empty: nothing)."""

    xml: str
    changes: tuple[str, ...]


def _is_q35(root: ET.Element) -> bool:
    type_ = root.find("os/type")
    return type_ is not None and "q35" in (type_.get("machine") or "")


def _has_shared_memory(root: ET.Element) -> bool:
    backing = root.find("memoryBacking")
    if backing is not None:
        access = backing.find("access")
        source = backing.find("source")
        if access is not None and access.get("mode") == "shared":
            return source is None or source.get("type") != "anonymous"
    # NUMA guests share memory per cell instead.
    cells = root.findall("cpu/numa/cell")
    return bool(cells) and all(cell.get("memAccess") == "shared" for cell in cells)


def has_shared_memory(xml: str) -> bool:
    """True if virtiofsd can map this domain's RAM (``memoryBacking`` or NUMA cells shared)."""
    return _has_shared_memory(_parse(xml).root)


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text, 0)
    except ValueError:
        return None


def _spare_root_ports(devices: ET.Element) -> int:
    """Root ports no device sits behind. A port without an index (not yet numbered by
    libvirt, e.g. one ``prepare`` just added) cannot have a device behind it yet."""
    used = {
        _int(address.get("bus"))
        for address in devices.iter("address")
        if address.get("type") == "pci"
    }
    spare = 0
    for controller in devices.findall("controller"):
        if controller.get("type") == "pci" and controller.get("model") == "pcie-root-port":
            index = _int(controller.get("index"))
            if index is None or index not in used:
                spare += 1
    return spare


def _ensure_shared_memory(root: ET.Element, changes: list[str]) -> None:
    if _has_shared_memory(root):
        return
    backing = root.find("memoryBacking")
    if backing is None:
        backing = ET.Element("memoryBacking")
        # Beside the memory sizes, where libvirt writes it; the schema does not care.
        children = list(root)
        position = len(children)
        for i, element in enumerate(children):
            if element.tag in ("maxMemory", "memory", "currentMemory"):
                position = i + 1
        _insert(root, root, backing, position)
        changes.append("added <memoryBacking>")
    source = backing.find("source")
    if source is None:
        _insert(root, backing, ET.Element("source", type="memfd"))
        changes.append("memory backing source: memfd")
    elif source.get("type") not in ("memfd", "file"):
        # Anonymous memory cannot be shared with virtiofsd; memfd can (hugepages too).
        source.set("type", "memfd")
        changes.append("memory backing source: memfd")
    access = backing.find("access")
    if access is None:
        _insert(root, backing, ET.Element("access", mode="shared"))
    else:
        access.set("mode", "shared")
    changes.append("memory access: shared (virtiofsd maps guest RAM)")


def _ensure_root_ports(root: ET.Element, wanted: int, changes: list[str]) -> None:
    devices = root.find("devices")
    if devices is None:
        devices = ET.Element("devices")
        _insert(root, root, devices)
    missing = wanted - _spare_root_ports(devices)
    if missing <= 0:
        return
    controllers = [c for c in devices.findall("controller")]
    if not any(c.get("type") == "pci" and c.get("model") == "pcie-root" for c in controllers):
        # Without an explicit pcie-root at index 0 libvirt would number the first root
        # port 0 and then refuse the domain (seen in guest/experiments/hotplug.py).
        pcie_root = ET.Element("controller", type="pci", index="0", model="pcie-root")
        _insert(root, devices, pcie_root, _after_last(devices, controllers))
        controllers.append(pcie_root)
    for _ in range(missing):
        port = ET.Element("controller", type="pci", model="pcie-root-port")
        _insert(root, devices, port, _after_last(devices, controllers))
        controllers.append(port)
    changes.append(f"added {missing} pcie-root-port controller(s) for hot-plug")


def _after_last(parent: ET.Element, elements: Sequence[ET.Element]) -> int | None:
    children = list(parent)
    positions = [children.index(e) for e in elements if e in children]
    return max(positions) + 1 if positions else None


def prepare_domain(xml: str, *, spare_root_ports: int = DEFAULT_SPARE_ROOT_PORTS) -> Prepared:
    """Make a domain definition able to take virtio-fs devices, touching nothing else.

    Shared memory (``<memoryBacking>`` with a memfd source and shared access; its other
    children are kept), and on q35 machines ``spare_root_ports`` free ``pcie-root-port``
    controllers so devices can be hot-plugged. Idempotent: a prepared definition comes back
    unchanged, as the same string.
    """
    if spare_root_ports < 0:
        raise InvalidArgument("the number of spare root ports cannot be negative")
    doc = _parse(xml)
    changes: list[str] = []
    _ensure_shared_memory(doc.root, changes)
    if _is_q35(doc.root):
        _ensure_root_ports(doc.root, spare_root_ports, changes)
    if not changes:
        return Prepared(xml, ())
    return Prepared(_write(doc), tuple(changes))


def prepare(xml: str, *, spare_root_ports: int = DEFAULT_SPARE_ROOT_PORTS) -> str:
    """``prepare_domain`` without the list of changes."""
    return prepare_domain(xml, spare_root_ports=spare_root_ports).xml


# -- tags and aliases ---------------------------------------------------------------------


def check_tag(tag: str) -> str:
    """Return ``tag`` if it is a valid virtio-fs tag, else raise InvalidArgument."""
    if _TAG.match(tag) is None:
        raise InvalidArgument(f"invalid tag {tag!r}: {TAG_RULE}")
    return tag


def derive_tag(volume_name: str | None, volume_id: str, taken: Collection[str] = ()) -> str:
    """A tag for a volume, unique among ``taken``: ``bv-<name>`` for a named volume and
    ``bv-<first 10 characters of its id, lowercase>`` for an anonymous one, cut to fit and
    suffixed ``-2``, ``-3``... when taken (case-insensitively, so two tags never differ
    only by case in a listing)."""
    stem = volume_name if volume_name else volume_id[:10].lower()
    base = _NOT_TAG_CHAR.sub("-", "bv-" + stem)[:TAG_MAX_BYTES]
    lowered = {t.lower() for t in taken}
    if base.lower() not in lowered:
        return base
    n = 2
    while True:
        suffix = f"-{n}"
        candidate = base[: TAG_MAX_BYTES - len(suffix)] + suffix
        if candidate.lower() not in lowered:
            return candidate
        n += 1


def alias_for_tag(tag: str) -> str:
    """The user alias of the device carrying ``tag``: ``ua-boxvol-`` + the tag with '.'
    and '_' escaped (libvirt allows neither '.' nor a free choice of characters in aliases);
    distinct tags always give distinct aliases."""
    check_tag(tag)
    escaped = tag.replace("_", "_u").replace(".", "_d")
    alias = ALIAS_PREFIX + escaped
    if _ALIAS_CHARS.match(alias) is None:  # pragma: no cover - guaranteed by check_tag
        raise InvalidArgument(f"no alias can be made for tag {tag!r}")
    return alias


# -- filesystem devices -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FilesystemDevice:
    """A virtio-fs ``<filesystem>`` found in a domain's XML."""

    tag: str
    socket: str | None
    alias: str | None
    #: The element as it appears in the domain XML (what a detach call is given).
    xml: str

    @property
    def managed(self) -> bool:
        """True if vmdriver attached it (its alias carries our prefix)."""
        return self.alias is not None and self.alias.startswith(ALIAS_PREFIX)


def filesystem_device(socket: str, tag: str, *, alias: str | None = None) -> str:
    """The ``<filesystem>`` element for a virtio-fs share served on a vhost-user ``socket``.

    ``type='mount'`` with an external daemon: libvirt only connects QEMU to the socket that
    boxvold serves; it never learns a host directory. ``queue='1024'`` is the queue size
    virtiofsd and QEMU agree on. ``<readonly/>`` is deliberately absent: libvirt 9 ignores it
    for an external daemon, so boxvold enforces read-only itself.
    """
    check_tag(tag)
    alias = alias if alias is not None else alias_for_tag(tag)
    if not alias.startswith("ua-") or _ALIAS_CHARS.match(alias) is None:
        raise InvalidArgument(
            f"invalid device alias {alias!r}: libvirt keeps only aliases of 'ua-' followed "
            "by letters, digits, '_' and '-'"
        )
    fs = ET.Element("filesystem", type="mount")
    ET.SubElement(fs, "driver", type="virtiofs", queue="1024")
    ET.SubElement(fs, "source", socket=socket)
    ET.SubElement(fs, "target", dir=tag)
    ET.SubElement(fs, "alias", name=alias)
    ET.indent(fs)
    return ET.tostring(fs, encoding="unicode")


def _virtiofs(element: ET.Element) -> bool:
    driver = element.find("driver")
    return driver is not None and driver.get("type") == "virtiofs"


def filesystems(xml: str) -> list[FilesystemDevice]:
    """Every virtio-fs ``<filesystem>`` device of a domain, in document order."""
    found = []
    devices = _parse(xml).root.find("devices")
    for fs in devices.findall("filesystem") if devices is not None else []:
        target, source, alias = fs.find("target"), fs.find("source"), fs.find("alias")
        if not _virtiofs(fs) or target is None or not target.get("dir"):
            continue
        element = copy.deepcopy(fs)
        element.tail = None
        found.append(
            FilesystemDevice(
                tag=target.get("dir", ""),
                socket=None if source is None else source.get("socket"),
                alias=None if alias is None else alias.get("name"),
                xml=ET.tostring(element, encoding="unicode"),
            )
        )
    return found


def boxvol_filesystems(xml: str) -> list[FilesystemDevice]:
    """The virtio-fs devices vmdriver attached (alias ``ua-boxvol-...``)."""
    return [fs for fs in filesystems(xml) if fs.managed]


def filesystem_tags(xml: str) -> set[str]:
    """Every filesystem target of a domain (any driver): tags a new share must not reuse."""
    devices = _parse(xml).root.find("devices")
    if devices is None:
        return set()
    return {
        target.get("dir", "")
        for target in devices.findall("filesystem/target")
        if target.get("dir")
    }


# -- attachment records (metadata) --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AttachmentRecord:
    """What vmdriver remembers about one attachment, inside the domain's own definition:
    the guest mount path in particular exists nowhere else (the device has only a tag)."""

    tag: str
    guest_path: str
    read_only: bool
    export_id: str
    volume_id: str
    volume_name: str | None
    via: str
    alias: str


def metadata_element(records: Iterable[AttachmentRecord]) -> str:
    """The ``<attachments>`` element handed to ``virDomainSetMetadata`` (key ``boxvol``,
    namespace ``NS``; libvirt adds the namespace itself)."""
    root = ET.Element("attachments")
    for r in records:
        attrs = {
            "tag": r.tag,
            "guest-path": r.guest_path,
            "mode": "ro" if r.read_only else "rw",
            "export": r.export_id,
            "volume": r.volume_id,
            "via": r.via,
            "alias": r.alias,
        }
        if r.volume_name is not None:
            attrs["volume-name"] = r.volume_name
        ET.SubElement(root, "attachment", attrs)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode")


def _records_in(container: ET.Element, ns: str) -> list[AttachmentRecord]:
    records = []
    for item in container.findall(f"{ns}attachment"):
        get = item.get
        tag, path, export, volume = get("tag"), get("guest-path"), get("export"), get("volume")
        if not (tag and path and export and volume):
            continue  # a damaged record is ignored rather than trusted
        records.append(
            AttachmentRecord(
                tag=tag,
                guest_path=path,
                read_only=get("mode") == "ro",
                export_id=export,
                volume_id=volume,
                volume_name=get("volume-name"),
                via=get("via", "direct"),
                alias=get("alias") or alias_for_tag(tag),
            )
        )
    return records


def attachment_records(xml: str) -> list[AttachmentRecord]:
    """vmdriver's records from a full domain XML (``<metadata><boxvol:attachments>``)."""
    container = _parse(xml).root.find(f"metadata/{{{NS}}}attachments")
    return [] if container is None else _records_in(container, f"{{{NS}}}")


def parse_metadata_element(text: str | None) -> list[AttachmentRecord]:
    """Records from what ``virDomainGetMetadata`` answers (the element, namespace-less)."""
    if not text:
        return []
    return _records_in(_parse(text).root, "")


# -- the guest's mount points on the kernel command line -----------------------------------


@dataclass(frozen=True, slots=True)
class MountWord:
    """One ``boxvol.mount=TAG:/guest/path[:ro]`` word of the test guest's command line."""

    tag: str
    guest_path: str
    read_only: bool = False

    def __str__(self) -> str:
        return f"{MOUNT_WORD}{self.tag}:{self.guest_path}{':ro' if self.read_only else ''}"


def check_cmdline_path(path: str) -> str:
    """Return ``path`` if the test guest's init can mount there, else raise InvalidArgument."""
    parts = path.split("/")
    if (
        _CMDLINE_PATH.match(path) is None
        or ".." in parts
        or path == "/"
        or any(path == p or path.startswith(p + "/") for p in _RESERVED_GUEST_PATHS)
    ):
        raise InvalidArgument(
            f"the guest path {path!r} cannot be passed on the kernel command line: give an "
            "absolute path of letters, digits, '.', '_', '-' and '/', not '/', not under "
            "/proc, /sys or /dev"
        )
    return path


def has_direct_kernel_boot(xml: str) -> bool:
    """True if the domain boots a kernel given in ``<os><kernel>`` (then ``<cmdline>`` is
    what its kernel sees, and the test guest reads its mounts there)."""
    kernel = _parse(xml).root.find("os/kernel")
    return kernel is not None and bool((kernel.text or "").strip())


def cmdline(xml: str) -> str:
    """The domain's ``<os><cmdline>`` text (empty if none)."""
    element = _parse(xml).root.find("os/cmdline")
    return "" if element is None else element.text or ""


def _mount_tag(word: str) -> str | None:
    if not word.startswith(MOUNT_WORD):
        return None
    return word[len(MOUNT_WORD) :].split(":", 1)[0]


def edit_mount_words(
    text: str, *, add: Sequence[MountWord] = (), remove_tags: Collection[str] = ()
) -> str:
    """A command line with the mount words of ``remove_tags`` (and of every tag in ``add``)
    taken out and ``add`` appended; every other word stays where and as it was."""
    for mount in add:
        check_tag(mount.tag)
        check_cmdline_path(mount.guest_path)
    drop = set(remove_tags) | {w.tag for w in add}
    # re.split with a group keeps the separators: [word, sep, word, sep, ..., word].
    parts = re.split(r"(\s+)", text.strip())
    kept: list[str] = []
    dropped = False
    for i in range(0, len(parts), 2):
        word = parts[i]
        if not word or _mount_tag(word) in drop:
            dropped = dropped or bool(word)
            continue
        if kept:
            kept.append(parts[i - 1] if i > 0 else " ")
        kept.append(word)
    if not dropped and not add:
        return text
    result = " ".join(w for w in ["".join(kept), *map(str, add)] if w)
    if len(result.encode()) > CMDLINE_MAX_BYTES:
        raise InvalidArgument(
            f"the kernel command line would be {len(result.encode())} bytes; the kernel reads "
            f"at most {CMDLINE_MAX_BYTES}; attach fewer volumes at boot or use shorter paths"
        )
    return result


def mount_words(text: str) -> list[MountWord]:
    """The ``boxvol.mount=`` words of a command line."""
    words = []
    for word in text.split():
        if not word.startswith(MOUNT_WORD):
            continue
        tag, _, rest = word[len(MOUNT_WORD) :].partition(":")
        read_only = rest.endswith(":ro")
        path = rest.removesuffix(":ro").removesuffix(":rw")
        words.append(MountWord(tag, path, read_only))
    return words


def update_cmdline(
    xml: str, *, add: Sequence[MountWord] = (), remove_tags: Collection[str] = ()
) -> str:
    """The domain XML with its ``<os><cmdline>`` mount words edited (see
    ``edit_mount_words``). Domains that do not boot a kernel directly come back unchanged:
    their command line belongs to their own boot loader."""
    doc = _parse(xml)
    os_ = doc.root.find("os")
    kernel = None if os_ is None else os_.find("kernel")
    if os_ is None or kernel is None or not (kernel.text or "").strip():
        return xml
    element = os_.find("cmdline")
    old = "" if element is None else element.text or ""
    new = edit_mount_words(old, add=add, remove_tags=remove_tags)
    if new == old:
        return xml
    if element is None:
        element = ET.Element("cmdline")
        children = list(os_)
        _insert(doc.root, os_, element, children.index(kernel) + 1)
    element.text = new
    return _write(doc)
