"""SIGHUP: re-read the config file and swap in what can change while serving (the server
certificate and key, the client CA, the client CRL, identities and policy), without
dropping a connection. A config that does not load leaves the serving one in place.

What a reload cannot change (it needs a restart): [token], the listen addresses (also
health_listen and metrics_listen), the processes, threads and limits of [server], and
whether TLS or client certificates are used at all. A changed [token] is named in the log line.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from server import config as config_mod
from server import tls
from server.config import Config
from server.errors import ConfigError
from server.policy import gate

log = logging.getLogger("hsmsignd")


def _read_or_none(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError:
        return None


class Reloader:
    """The config a serving process serves with, and how to replace it on SIGHUP."""

    def __init__(self, cfg: Config, address: str) -> None:
        """Raises ConfigError when the TLS files no longer read as they did at start."""
        self.cfg = cfg
        self.address = address
        self.material = tls.read_tls(cfg)
        self.crl = _read_or_none(cfg.access.identities.client_crl)
        self._lock = threading.Lock()

    def reload_in_background(self) -> None:
        """For the signal handler: the reload reads files, so it runs on its own thread."""
        threading.Thread(target=self.reload, name="reload", daemon=True).start()

    def reload(self) -> None:
        """Loads the config file again with the checks of a start; on success swaps the
        certificate for new handshakes and installs a new gate, and logs what changed; on
        failure logs one WARNING and keeps serving as before. Never raises."""
        with self._lock:
            try:
                self._reload()
            except ConfigError as e:
                log.warning("SIGHUP: config not reloaded, still serving the previous one: %s", e)
            except Exception as e:  # a reload must never stop the serving process
                log.warning(
                    "SIGHUP: config not reloaded, still serving the previous one: %s: %s",
                    type(e).__name__,
                    e,
                )

    def _reload(self) -> None:
        new = config_mod.load(self.cfg.path)
        material = tls.read_tls(new)
        old = self.material
        if (material is None) != (old is None) or (
            material is not None
            and old is not None
            and (material.client_ca is None) != (old.client_ca is None)
        ):
            raise ConfigError(
                f"{new.path}: turning TLS or client certificates on or off needs a restart"
            )
        new_gate = gate.Gate(new.access, new, self.address, previous=gate.installed())
        crl = _read_or_none(new.access.identities.client_crl)
        changed: list[str] = []
        if material is not None and old is not None:
            if (material.cert, material.key) != (old.cert, old.key):
                changed.append("TLS certificate")
            if material.client_ca != old.client_ca:
                changed.append("client CA")
        if crl != self.crl or new.access.identities.client_crl != (
            self.cfg.access.identities.client_crl
        ):
            changed.append("CRL")
        identities_old, identities_new = self.cfg.access.identities, new.access.identities
        if (identities_old.mtls, identities_old.oidc, identities_old.local) != (
            identities_new.mtls,
            identities_new.oidc,
            identities_new.local,
        ):
            changed.append("identities")
        if new.access.policy != self.cfg.access.policy:
            changed.append("policy")
        # Certificates first: a gate for a new client CA should not see old-CA handshakes.
        if material is not None and material != old:
            tls.certificates.offer(material)
        gate.install(new_gate)
        token_changed = new.token != self.cfg.token
        self.cfg, self.material, self.crl = new, material, crl
        restart = "; [token] changed: a restart is needed for [token]" if token_changed else ""
        log.info(
            "SIGHUP: config reloaded (%s)%s",
            ", ".join(changed) if changed else "nothing changed",
            restart,
        )
