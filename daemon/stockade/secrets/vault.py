"""The OpenBao / HashiCorp Vault secret backend: KV version 2, through hvac.

Secrets live at `MOUNT/data/PREFIX/NAME` as `{"value": text}` (or `{"value_b64": ...}` for
bytes that are not UTF-8), so operators may also write them with `bao kv put`. Creation uses
check-and-set 0 (fails if the secret exists); rotation needs it to exist. Authentication is
a token (read from a file, never the environment) or AppRole. TLS is always verified
(`vault_ca_bundle` names a private CA); plain http is accepted only for a loopback address,
as with `bao server -dev`.
"""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import hvac
import hvac.exceptions
import requests

from stockade.secrets.model import (
    SecretBackendError,
    SecretError,
    SecretExists,
    SecretInfo,
    SecretNotFound,
    check_name,
    check_value,
    strip_line_ending,
)

TIMEOUT_SECONDS = 10


def _loopback(address: str) -> bool:
    host = urlparse(address).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _time(text: str) -> str:
    """Vault's nanosecond timestamps, cut to seconds like the local store's."""
    return text.split(".", maxsplit=1)[0].rstrip("Z") + "Z" if text else ""


class VaultSecretStore:
    backend = "vault"

    def __init__(
        self,
        address: str,
        *,
        mount: str = "secret",
        prefix: str = "stockade",
        token_file: Path | None = None,
        role_id: str | None = None,
        secret_id_file: Path | None = None,
        ca_bundle: Path | None = None,
    ) -> None:
        scheme = urlparse(address).scheme
        if scheme != "https" and not (scheme == "http" and _loopback(address)):
            raise SecretError(f"vault_address {address!r}: use https (http only on loopback)")
        self._mount = mount
        self._prefix = prefix.strip("/")
        verify: bool | str = str(ca_bundle) if ca_bundle else True
        self._client = hvac.Client(url=address, verify=verify, timeout=TIMEOUT_SECONDS)
        try:
            if role_id and secret_id_file:
                secret_id = secret_id_file.read_text().strip()
                self._client.auth.approle.login(role_id=role_id, secret_id=secret_id)
            elif token_file:
                self._client.token = token_file.read_text().strip()
            else:
                raise SecretError(
                    "vault: give vault_token_file, or vault_role_id with vault_secret_id_file"
                )
            if not self._client.is_authenticated():
                raise SecretBackendError(f"vault at {address} does not accept our credentials")
        except OSError as exc:
            raise SecretError(f"vault credentials: {exc.strerror}: {exc.filename}") from None
        except (hvac.exceptions.VaultError, requests.RequestException) as exc:
            raise SecretBackendError(f"vault at {address}: {exc.__class__.__name__}") from None

    def _path(self, name: str) -> str:
        return f"{self._prefix}/{check_name(name)}"

    def _call(self, what: str, action: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return action(*args, mount_point=self._mount, **kwargs)
        except hvac.exceptions.InvalidPath:
            raise SecretNotFound(f"no secret named {what!r} in vault") from None
        except (hvac.exceptions.VaultError, requests.RequestException) as exc:
            # The exception text may quote the request body; never show it.
            raise SecretBackendError(
                f"vault refused or failed ({exc.__class__.__name__})"
            ) from None

    def _metadata(self, name: str) -> dict[str, Any]:
        kv = self._client.secrets.kv.v2
        answer = self._call(name, kv.read_secret_metadata, path=self._path(name))
        data: dict[str, Any] = answer["data"]
        return data

    def set(self, name: str, value: bytes, *, rotate: bool) -> SecretInfo:
        value, stripped = strip_line_ending(value)
        check_value(value)
        kv = self._client.secrets.kv.v2
        try:
            current = self._metadata(name)["current_version"]
        except SecretNotFound:
            current = None
        if rotate and current is None:
            raise SecretNotFound(f"no secret named {name!r} to rotate (use `secret set`)")
        if not rotate and current is not None:
            raise SecretExists(f"secret {name!r} exists; use `stockade secret rotate {name}`")
        try:
            payload = {"value": value.decode()}
        except UnicodeDecodeError:
            payload = {"value_b64": base64.b64encode(value).decode()}
        self._call(
            name,
            kv.create_or_update_secret,
            path=self._path(name),
            secret=payload,
            cas=current or 0,
        )
        return replace(self._info(name), line_ending_stripped=stripped)

    def get(self, name: str) -> bytes:
        kv = self._client.secrets.kv.v2
        answer = self._call(
            name, kv.read_secret_version, path=self._path(name), raise_on_deleted_version=True
        )
        data = answer["data"]["data"] or {}
        if "value_b64" in data:
            return base64.b64decode(data["value_b64"])
        if isinstance(data.get("value"), str):
            return str(data["value"]).encode()
        raise SecretError(f"vault secret {name!r} has no `value` field")

    def remove(self, name: str) -> None:
        self._metadata(name)  # NotFound when absent, like the local store
        kv = self._client.secrets.kv.v2
        self._call(name, kv.delete_metadata_and_all_versions, path=self._path(name))

    def list(self) -> list[SecretInfo]:
        kv = self._client.secrets.kv.v2
        try:
            answer = self._call("(any)", kv.list_secrets, path=self._prefix)
        except SecretNotFound:
            return []
        names = [k for k in answer["data"]["keys"] if not k.endswith("/")]
        return [self._info(n) for n in sorted(names)]

    def _info(self, name: str) -> SecretInfo:
        meta = self._metadata(name)
        version = int(meta["current_version"])
        rotated = meta["versions"][str(version)]["created_time"]
        return SecretInfo(name, self.backend, _time(meta["created_time"]), _time(rotated), version)
