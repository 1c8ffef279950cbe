"""boxvold's config file: every refusal names the file, the key and the reason; precedence
is option > environment > file > default; a reload's changes are sorted into live and not."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import REPO
from volumed import config
from volumed.config import Config, changes, parse, resolve
from volumed.errors import InvalidArgument

PATH = "/etc/boxvol/boxvold.toml"


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ('log_level = "LOUD"', "log_level", "must be one of DEBUG, INFO, WARNING, ERROR"),
        ("log_level = 3", "log_level", "must be one of"),
        ('home = "relative/dir"', "home", "must be an absolute path"),
        ("home = 1", "home", "must be a string, not an integer"),
        ('runtime_dir = ""', "runtime_dir", "non-empty"),
        ('socket_group = "a:b"', "socket_group", "must be a group name"),
        ("vhost_group = true", "vhost_group", "must be a string, not a boolean"),
        ('reserve_size = "lots"', "reserve_size", "invalid size"),
        ("reserve_size = -1", "reserve_size", "must not be negative"),
        ("reserve_size = 1.5", "reserve_size", "not a float"),
        ('virtiofsd = "virtiofsd"', "virtiofsd", "must be an absolute path"),
        ('virtiofsd_cache = "none"', "virtiofsd_cache", "must be one of auto, always, never"),
        ('export_cache = "never"', "export_cache", "must be one of auto, none, always"),
        ('log_levl = "INFO"', "log_levl", "unknown key; known keys: home, runtime_dir"),
        ("[boxvold]\nhome = '/x'", "boxvold", "unknown key"),
    ],
)
def test_a_bad_key_is_refused_naming_file_key_and_reason(text: str, key: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse(text, PATH)
    message = caught.value.message
    assert message.startswith(f"boxvold: {PATH}: key {key!r}: "), message
    assert reason in message
    assert "\n" not in message


def test_a_syntax_error_names_the_file() -> None:
    with pytest.raises(InvalidArgument, match=re.escape(f"boxvold: {PATH}: not valid TOML")):
        parse("log_level = ", PATH)


def test_good_values_parse() -> None:
    values = parse(
        'home = "/srv/boxvol/"\nlog_level = "debug"\nreserve_size = "128M"\n'
        'virtiofsd_cache = "never"\nexport_cache = "none"\nsocket_group = "boxvol"\n',
        PATH,
    )
    assert values == {
        "home": "/srv/boxvol",
        "log_level": "DEBUG",
        "reserve_bytes": 128 << 20,
        "virtiofsd_cache": "never",
        "export_cache": "none",
        "socket_group": "boxvol",
    }
    assert parse("reserve_size = 0", PATH) == {"reserve_bytes": 0}


def test_missing_default_file_means_defaults_but_a_named_one_must_exist(tmp_path: Path) -> None:
    missing = f"{tmp_path}/nope.toml"
    assert config.read_file(missing, explicit=False) == ""
    with pytest.raises(InvalidArgument, match=re.escape(f"boxvold: {missing}: no such file")):
        config.read_file(missing, explicit=True)


def test_config_path_precedence() -> None:
    assert config.config_path("/a.toml", {"BOXVOL_CONFIG": "/b.toml"}) == ("/a.toml", True)
    assert config.config_path(None, {"BOXVOL_CONFIG": "/b.toml"}) == ("/b.toml", True)
    assert config.config_path(None, {}) == (config.DEFAULT_PATH, False)


def test_option_beats_environment_beats_file_beats_default() -> None:
    file_values = parse('log_level = "WARNING"\nhome = "/from/file"\nreserve_size = "2M"', PATH)
    env = {"BOXVOL_LOG_LEVEL": "ERROR", "BOXVOL_HOME": "/from/env", "HOME": "/root"}
    options = {"log_level": "DEBUG", "home": None, "reserve_size": None}
    settings = resolve(file_values, env, options, euid=0)
    assert settings.log_level == "DEBUG"  # option
    assert settings.home == "/from/env"  # environment over the file
    assert settings.reserve_bytes == 2 << 20  # file over the default
    assert settings.export_cache == "auto"  # default
    assert settings.runtime_dir == "/run/boxvol"  # built-in location for root
    bare = resolve({}, {"HOME": "/home/u", "XDG_DATA_HOME": "/xdg"}, {}, euid=1000)
    assert bare.home == "/xdg/boxvol"
    assert resolve(file_values, {}, {}, euid=0).home == "/from/file"


def test_a_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(InvalidArgument, match="environment BOXVOL_RESERVE_SIZE: invalid size"):
        resolve({}, {"BOXVOL_RESERVE_SIZE": "huge"}, {}, euid=0)


def test_changes_are_sorted_into_live_and_next_start() -> None:
    old = Config(home="/a", runtime_dir="/r", log_level="INFO")
    new = Config(home="/b", runtime_dir="/r", log_level="DEBUG", export_cache="none")
    found = {c.key: c.live for c in changes(old, new)}
    assert found == {"home": False, "log_level": True, "export_cache": True}
    now = config.applied(old, changes(old, new))
    assert (now.home, now.log_level, now.export_cache) == ("/a", "DEBUG", "none")


def test_the_example_file_names_every_key_at_its_default() -> None:
    example = (REPO / "systemd" / "boxvold.toml").read_text()
    uncommented = "\n".join(
        line[1:] for line in example.splitlines() if re.match(r"#[a-z_]+ = ", line)
    )
    values = parse(uncommented, "systemd/boxvold.toml")
    assert sorted(values) == sorted(config.field_of(key) for key in config.KEYS)
    defaults = Config()
    for field in ("log_level", "reserve_bytes", "virtiofsd_cache", "export_cache"):
        assert values[field] == getattr(defaults, field), field


def test_the_example_file_as_shipped_means_every_default() -> None:
    assert config.load(str(REPO / "systemd" / "boxvold.toml")) == Config()


def test_the_daemon_configuration_carries_every_setting() -> None:
    from volumed.daemon import DaemonConfig

    settings = Config(
        home="/h",
        runtime_dir="/r",
        socket_group="s",
        vhost_group="v",
        log_level="ERROR",
        reserve_bytes=7,
        virtiofsd="/bin/v",
        virtiofsd_cache="never",
        export_cache="always",
    )
    assert DaemonConfig.from_settings(settings).settings == settings
