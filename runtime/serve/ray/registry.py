"""Which replica serves what, where: the registry actor behind /health's `deployments`.

Every component replica registers its report (node id and IP, artifact file, sha256, backend and
providers per graph) when it has loaded; /health lists the reports of the replicas still alive. A
replica is alive while Ray still knows its actor by name (Serve names every replica actor; a dead
one, e.g. on a lost node, loses its name), so a replica Serve replaced drops out by itself.
"""

from __future__ import annotations

import logging
from typing import Any

import ray

log = logging.getLogger(__name__)

SERVE_NAMESPACE = "serve"  # where Ray Serve names its replica actors


class ReplicaRegistry:
    def __init__(self) -> None:
        self._reports: dict[str, dict[str, Any]] = {}

    def register(self, report: dict[str, Any]) -> None:
        key = report.get("actor_name") or report.get("replica") or f"{report['node_id']}:{report['pid']}"
        self._reports[key] = report
        log.info("replica %s of %s registered on node %s", key, report.get("component"), report.get("node_ip"))

    def reports(self) -> dict[str, list[dict[str, Any]]]:
        """Reports of live replicas, by component; the reports of dead replicas are dropped."""
        live: dict[str, list[dict[str, Any]]] = {}
        for key, report in list(self._reports.items()):
            if report.get("actor_name") and not _alive(report["actor_name"]):
                del self._reports[key]
                continue
            live.setdefault(report["component"], []).append(report)
        return live


def _alive(actor_name: str) -> bool:
    try:
        ray.get_actor(actor_name, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True
