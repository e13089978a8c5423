"""`voxport serve serve.engine=ray`: start (or join) a Ray cluster, deploy the application, serve until
SIGTERM / Ctrl-C, then take down what we started.

`serve.ray.address` null starts a local cluster (`serve.ray.num_cpus` CPUs); on exit the application,
Serve and the cluster are shut down (no Ray process is left). Set, it joins that cluster (`auto`,
`ray://host:10001`): on exit only our application and our two actors are deleted. The voice library
actor and the replica registry are named, detached actors pinned to the launcher's node: the
library's files live on this node's disk (serve.voices_dir), and they outlive a driver that dies
without cleaning up (a relaunch takes them over by name instead of a second writer appearing).
The bundle directory must be visible at the same path on every node (a shared or synced volume).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from voxport.errors import ConfigError
from voxport.runtime.serve.access import ApiKeys
from voxport.runtime.serve.ray.components import SpeakerEncoder, Synthesizer, Vocoder
from voxport.runtime.serve.ray.ingress import Ingress
from voxport.runtime.serve.ray.library_actor import LibraryActor
from voxport.runtime.serve.ray.registry import ReplicaRegistry
from voxport.runtime.serve.settings import DeploymentSettings, ServeSettings

log = logging.getLogger(__name__)

DEPLOY_TIMEOUT_S = 300.0


def deployment_options(spec: DeploymentSettings, name: str) -> dict[str, Any]:
    """Serve `.options(...)` of one deployment from its `serve.ray.<name>` settings."""
    actor: dict[str, Any] = {"num_cpus": spec.num_cpus}
    if spec.num_gpus:
        actor["num_gpus"] = spec.num_gpus
    if spec.resources:
        actor["resources"] = dict(spec.resources)
    options = {"name": name, "ray_actor_options": actor, "max_ongoing_requests": spec.max_ongoing_requests,
               **spec.replicas()}
    if spec.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = spec.max_replicas_per_node
    return options


def actor_names(settings: ServeSettings) -> tuple[str, str]:
    return f"{settings.ray.app_name}-voice-library", f"{settings.ray.app_name}-replicas"


def components(settings: ServeSettings, registry: str | None) -> dict[str, Any]:
    """The three component deployments, bound (each gets the bundle, the target and its own settings)."""
    ray_cfg, target = settings.ray, settings.target
    common = (str(Path(settings.bundle_dir).resolve()), tuple(target.preference), target.strict, settings.threads)
    shared = {"registry": registry, "namespace": ray_cfg.namespace, "cpu_arena": settings.cpu_arena}
    return {
        "speaker_encoder": serve.deployment(SpeakerEncoder).options(
            **deployment_options(ray_cfg.speaker_encoder, "speaker_encoder")).bind(
            *common, max_batch_size=ray_cfg.speaker_encoder.max_batch_size,
            batch_wait_timeout_s=ray_cfg.speaker_encoder.batch_wait_timeout_s, **shared),
        "synthesizer": serve.deployment(Synthesizer).options(
            **deployment_options(ray_cfg.synthesizer, "synthesizer")).bind(
            *common, progress_steps=ray_cfg.synthesizer_progress_steps, **shared),
        "vocoder": serve.deployment(Vocoder).options(**deployment_options(ray_cfg.vocoder, "vocoder")).bind(
            *common, max_batch_size=ray_cfg.vocoder.max_batch_size,
            batch_wait_timeout_s=ray_cfg.vocoder.batch_wait_timeout_s, **shared),
    }


def application(settings: ServeSettings, keys: ApiKeys) -> Any:
    """The whole application: the ingress over the three component deployments."""
    library, registry = actor_names(settings)
    parts = components(settings, registry)
    return serve.deployment(Ingress).options(**deployment_options(settings.ray.ingress, "ingress")).bind(
        settings, keys, parts["speaker_encoder"], parts["synthesizer"], parts["vocoder"], library, registry,
        settings.ray.namespace)


def start_actors(settings: ServeSettings) -> tuple[Any, Any]:
    """The registry and the voice library owner, on this node (where serve.voices_dir is)."""
    library_name, registry_name = actor_names(settings)
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    common = {"namespace": settings.ray.namespace, "lifetime": "detached", "get_if_exists": True, "num_cpus": 0,
              "scheduling_strategy": here, "max_restarts": 0}
    registry = ray.remote(ReplicaRegistry).options(name=registry_name, **common).remote()
    limits = settings.limits
    library = ray.remote(LibraryActor).options(name=library_name, **common).remote(
        str(Path(settings.voices_dir).resolve()), limits.max_voices, limits.max_library_bytes)
    where = ray.get(library.where.remote(), timeout=60)  # the library opened (or its error, now)
    log.info("voice library actor %s on node %s: %s", library_name, where["node_ip"], where["root"])
    return library, registry


def connect(settings: ServeSettings) -> bool:
    """ray.init for `serve.ray`; True when we started the cluster (and so must stop it)."""
    cfg = settings.ray
    if cfg.address is None:
        ray.init(num_cpus=cfg.num_cpus, namespace=cfg.namespace, include_dashboard=False)
        return True
    try:
        ray.init(address=cfg.address, namespace=cfg.namespace)
    except ConnectionError as exc:
        raise ConfigError(f"serve.ray.address={cfg.address}: no Ray cluster there ({exc})") from None
    return False


def deploy(settings: ServeSettings, keys: ApiKeys) -> tuple[Any, Any]:
    """Serve's HTTP proxy on serve.host:serve.port, our actors, and the application; returns the actors."""
    # One HTTP proxy, on the head node: the address clients use does not move when a worker node goes.
    serve.start(proxy_location="HeadOnly", http_options={
        "host": settings.host, "port": settings.port, "request_timeout_s": settings.request_timeout_s + 10})
    actors = start_actors(settings)
    serve.run(application(settings, keys), name=settings.ray.app_name, route_prefix="/", blocking=False)
    return actors


def teardown(settings: ServeSettings, actors: tuple[Any, Any] | None, started: bool) -> None:
    """Delete our application and actors; for a cluster we started, stop Serve and Ray as well."""
    try:
        if serve.status().applications.get(settings.ray.app_name) is not None:
            serve.delete(settings.ray.app_name)
    except Exception:  # noqa: BLE001 - best effort: the cluster may be going down already
        log.exception("deleting the Serve application failed")
    for actor in actors or ():
        try:
            if actor is actors[0]:
                ray.get(actor.close.remote(), timeout=30)  # the library's SQLite closed cleanly
            ray.kill(actor)
        except Exception:  # noqa: BLE001
            log.exception("stopping an actor failed")
    if started:
        serve.shutdown()
        ray.shutdown()
        log.info("Ray Serve and the local Ray cluster are shut down")
    else:
        ray.shutdown()  # disconnects; the cluster goes on
        log.info("application %s deleted from the cluster", settings.ray.app_name)


def run(settings: ServeSettings, keys: ApiKeys) -> None:
    """Serve on Ray until SIGTERM / SIGINT."""
    stop = threading.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in signals}
    started, actors = False, None
    try:
        started = connect(settings)
        for sig in signals:  # ray.init installs its own SIGTERM handler (exit at once): ours tears down in order
            signal.signal(sig, lambda *_: stop.set())
        actors = deploy(settings, keys)
        log.info("voxport serve (ray): http://%s:%d, bundle %s, voices %s", settings.host, settings.port,
                 settings.bundle_dir, settings.voices_dir)
        _wait_running(settings, stop)
        while not stop.wait(1.0):
            pass
        log.info("signal received: shutting the application down")
    finally:
        if ray.is_initialized():
            teardown(settings, actors, started)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_running(settings: ServeSettings, stop: threading.Event) -> None:
    """Until the application is RUNNING; a deployment that fails to start (an artifact's sha256, the
    bundle not visible on a node) fails the launch with Serve's message."""
    deadline = time.monotonic() + DEPLOY_TIMEOUT_S
    while not stop.is_set():
        app = serve.status().applications.get(settings.ray.app_name)
        status = str(app.status) if app is not None else "NOT_STARTED"
        if status.endswith("RUNNING"):
            log.info("application %s is running", settings.ray.app_name)
            return
        if status.endswith("DEPLOY_FAILED") or status.endswith("UNHEALTHY"):
            raise ConfigError(f"the Ray Serve application failed to start: {app.message}")
        if time.monotonic() > deadline:
            raise ConfigError(f"the Ray Serve application is not running after {DEPLOY_TIMEOUT_S:g} s ({status})")
        stop.wait(1.0)
