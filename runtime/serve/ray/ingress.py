"""The ingress deployment: the very FastAPI app `voxport serve` builds (runtime/serve/app.py
create_app), served by Ray Serve's FastAPI integration, over the component deployments (proxy.py)
and the voice library actor (library_actor.py). Admission, work budgets, timeouts, access control,
errors and metrics are the local engine's own code; only where the work runs differs."""

from __future__ import annotations

import logging
from typing import Any

import ray
from fastapi import FastAPI
from ray import serve

from voxport.runtime.serve.access import ApiKeys
from voxport.runtime.serve.app import create_app
from voxport.runtime.serve.ray.components import _where
from voxport.runtime.serve.ray.library_actor import RemoteLibrary
from voxport.runtime.serve.ray.proxy import RemoteCloner, unwrap
from voxport.runtime.serve.service import Service
from voxport.runtime.serve.settings import ServeSettings

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 10.0


class RayService(Service):
    """Service whose /health also says engine `ray` and, per deployment, each live replica's node and
    the artifact (file, sha256, backend, providers) serving each of its graphs."""

    def __init__(self, settings: ServeSettings, cloner: RemoteCloner, library: RemoteLibrary,
                 registry: Any, library_actor: str) -> None:
        super().__init__(settings, cloner=cloner, library=library)
        self._registry, self._library_actor = registry, library_actor

    def deployments(self) -> dict[str, Any]:
        reports = unwrap(lambda: ray.get(self._registry.reports.remote(), timeout=HEALTH_TIMEOUT_S), "registry")
        out: dict[str, Any] = {}
        for component, replicas in sorted(reports.items()):
            out[component] = {"replicas": [
                {**{k: r.get(k) for k in ("replica", "node_id", "node_ip", "pid")},
                 "artifacts": {key: {k: g.get(k) for k in ("file", "sha256", "format", "precision", "backend",
                                                            "providers", "reason")}
                               for key, g in r.get("graphs", {}).items()}}
                for r in replicas]}
            out[component]["num_replicas"] = len(replicas)
        library = self.library.actor  # type: ignore[attr-defined]
        out["voice_library"] = {"actor": self._library_actor, **unwrap(
            lambda: ray.get(library.where.remote(), timeout=HEALTH_TIMEOUT_S), "voice library")}
        return out

    def health(self) -> dict[str, Any]:
        return {**super().health(), "engine": "ray", "deployments": self.deployments()}


class IngressServer:
    """Constructed in each ingress replica; `__serve_build_asgi_app__` builds the app there (never on the
    driver), once the component deployments answer."""

    def __init__(self, settings: ServeSettings, keys: ApiKeys, speaker_encoder: Any, synthesizer: Any,
                 vocoder: Any, library_actor: str, registry_actor: str, namespace: str) -> None:
        self.settings, self.keys = settings, keys
        self.handles = {"speaker_encoder": speaker_encoder, "synthesizer": synthesizer, "vocoder": vocoder}
        self.library_actor, self.registry_actor, self.namespace = library_actor, registry_actor, namespace

    async def __serve_build_asgi_app__(self) -> FastAPI:
        reports = {name: await handle.describe.remote() for name, handle in self.handles.items()}
        cloner = RemoteCloner(self.settings.bundle_dir, self.handles, reports, self.settings.request_timeout_s)
        registry = ray.get_actor(self.registry_actor, namespace=self.namespace)
        await registry.register.remote({**_where(), "component": "ingress", "graphs": {}})
        library = RemoteLibrary(self.library_actor, self.namespace)
        service = RayService(self.settings, cloner, library, registry, self.library_actor)
        return create_app(self.settings, service, self.keys)


Ingress = serve.ingress()(IngressServer)
