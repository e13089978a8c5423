"""`voxport serve serve.engine=ray`: the service as a Ray Serve application.

The same FastAPI app and code path as `voxport serve` (runtime/serve/app.py) runs in an ingress
deployment; its engine talks to a cloner-shaped proxy (proxy.py) whose calls go to one deployment
per component (components.py: speaker encoder and vocoder batched with `@serve.batch`, the
synthesizer's decoder loop inside one replica per request). The voice library has one owner, a
named actor (library_actor.py); replicas report what they serve to a registry actor (registry.py);
launcher.py starts or joins the cluster, deploys, and shuts down on SIGTERM / Ctrl-C.
"""
