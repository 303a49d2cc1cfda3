"""Settings: environment over TOML file over defaults; each error is one line naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from stockade.config import MiB, SettingsError, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("STOCKADE_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "stockaded.toml"
    path.write_text(text)
    return path


def test_defaults_are_the_hardened_ones() -> None:
    settings = load_settings()
    assert settings.max_message_bytes == 4 * MiB
    assert settings.container_user == "10001:10001"
    assert settings.container_memory_bytes == 256 * MiB
    assert settings.container_pids_limit == 64


def test_root_gets_system_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 0)
    settings = load_settings()
    assert settings.state_dir == Path("/var/lib/stockade")
    assert settings.socket_path == Path("/run/stockade/stockaded.sock")


def test_non_root_gets_xdg_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    settings = load_settings()
    assert settings.state_dir == tmp_path / "state" / "stockade"
    assert settings.socket_path == tmp_path / "run" / "stockade" / "stockaded.sock"


def test_file_values_apply(tmp_path: Path) -> None:
    path = write(tmp_path, 'log_level = "debug"\nmax_message_bytes = 2048\n')
    settings = load_settings(path)
    assert settings.log_level == "debug"
    assert settings.max_message_bytes == 2048


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, 'log_level = "debug"\n')
    monkeypatch.setenv("STOCKADE_LOG_LEVEL", "error")
    assert load_settings(path).log_level == "error"


@pytest.mark.parametrize(
    ("env", "value", "expected"),
    [
        ("STOCKADE_MAX_MESSAGE_BYTES", "12", "bad setting max_message_bytes"),
        ("STOCKADE_MAX_MESSAGE_BYTES", "lots", "bad setting max_message_bytes"),
        ("STOCKADE_LOG_LEVEL", "loud", "bad setting log_level"),
        ("STOCKADE_STATE_DIR", "relative/dir", "bad setting state_dir"),
        ("STOCKADE_CONTAINER_USER", "0:0", "bad setting container_user"),
        ("STOCKADE_CONTAINER_USER", "root", "bad setting container_user"),
    ],
)
def test_bad_environment_value_names_the_setting(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith(expected)
    assert env in message
    assert "\n" not in message


def test_unknown_key_in_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, 'log_levl = "debug"\n')
    with pytest.raises(SettingsError, match=r"unknown setting 'log_levl'.*stockaded\.toml"):
        load_settings(path)


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, 'log_level = "info"\nmax_message_bytes = = 3\n')
    with pytest.raises(SettingsError, match=r"stockaded\.toml.*line 2"):
        load_settings(path)


def test_missing_explicit_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
