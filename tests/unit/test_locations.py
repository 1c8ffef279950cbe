"""Where clients find boxvold's socket."""

from __future__ import annotations

from volumed.locations import socket_path

SYSTEM = "/run/boxvol/boxvold.sock"


def test_root_and_explicit_settings_win() -> None:
    assert socket_path({}, 0) == SYSTEM
    assert socket_path({"BOXVOL_SOCKET": "/x.sock"}, 1000) == "/x.sock"
    assert socket_path({"BOXVOL_RUNTIME_DIR": "/r"}, 1000, exists=lambda p: False) == (
        "/r/boxvold.sock"
    )


def test_a_user_talks_to_their_own_boxvold_else_to_the_systems() -> None:
    env = {"XDG_RUNTIME_DIR": "/run/user/1000"}
    own = "/run/user/1000/boxvol/boxvold.sock"
    assert socket_path(env, 1000, exists=lambda p: p == own) == own
    assert socket_path(env, 1000, exists=lambda p: p == SYSTEM) == SYSTEM
    assert socket_path(env, 1000, exists=lambda p: True) == own
    assert socket_path(env, 1000, exists=lambda p: False) == own  # the error names it
