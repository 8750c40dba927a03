"""Finds a stage's replicas in the EndpointSlices of its Kubernetes Service.

`EndpointSliceWatcher` lists, then watches, the `discovery.k8s.io/v1` EndpointSlices
labelled `kubernetes.io/service-name=<service>` and turns what they say into
membership changes of the stage's ReplicaSet (gateway/replicas.py):
- an endpoint that is ready joins (`add`; it gets work once a health check answers);
- one that is terminating, or not ready, gets no new work (`drain`; a not-ready one
  that was never in the pool does not join);
- one that is in no slice any more leaves (`remove`).
Addresses the pool had before (a static list) are never removed by the watcher.

The official `kubernetes` client is synchronous, so the watcher runs in a thread and
hands each new picture of the service to the gateway's event loop with
`call_soon_threadsafe`; the pool is only ever changed on that loop. A lost API server
(refused, reset, an error status) logs one WARNING, then the watcher re-lists with a
capped back-off while the pool keeps the replicas it knows; an expired resourceVersion
(410 Gone) re-lists at once. Wiring this to flags and to `serve` is left to
gateway/main.py (`watch_stage` is the one call it needs).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from ditmesh.gateway.replicas import ReplicaSet
from ditmesh.gateway.stages import StagePool

log = logging.getLogger(__name__)

SERVICE_LABEL = "kubernetes.io/service-name"
_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@dataclass(frozen=True, slots=True)
class ServiceRef:
    """A stage's Service: `NAMESPACE/NAME:PORT`, PORT a number or the name of a Service port."""

    namespace: str
    name: str
    port: int | str

    @classmethod
    def parse(cls, text: str) -> ServiceRef:
        """`NAMESPACE/NAME:PORT`, or `NAME:PORT` for the gateway's own namespace."""
        ref, sep, port = text.rpartition(":")
        if not sep or not ref or not port:
            raise ValueError(f"{text!r}: a service is NAMESPACE/NAME:PORT (PORT a number or name)")
        namespace, _, name = ref.rpartition("/")
        return cls(
            namespace=namespace or own_namespace(),
            name=name,
            port=int(port) if port.isdigit() else port,
        )


def own_namespace() -> str:
    """The namespace the gateway's pod runs in ("default" outside a cluster)."""
    if _SA_NAMESPACE.exists():
        return _SA_NAMESPACE.read_text().strip()
    return "default"


def api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """A client from a kubeconfig file, or from the pod's service account when None.

    urllib3 retries off: by default a read that times out is tried three more times, so a
    hung API server held each call for four times its stated timeout. Every caller here
    (discovery's watch, the autoscaler's period, leader election) tries again on its own
    schedule."""
    cfg = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    else:
        config.load_incluster_config(client_configuration=cfg)
    cfg.retries = 0
    return client.ApiClient(cfg)


def endpoints_of(eps: client.V1EndpointSlice, port: int | str) -> dict[str, bool]:
    """`host:port` -> ready, for the endpoints of one slice.

    Kubernetes leaves `ready` unset when it does not know, which means ready; a
    terminating endpoint is never ready here, even where the Service publishes
    not-ready addresses (then Kubernetes keeps `ready` true while it terminates)."""
    if isinstance(port, str):
        number = next((p.port for p in eps.ports or [] if p.name == port), None)
        if number is None:
            return {}
    else:
        number = port
    out: dict[str, bool] = {}
    for ep in eps.endpoints or []:
        if not ep.addresses:
            continue
        host = ep.addresses[0]  # addresses of one endpoint are the same pod
        address = f"[{host}]:{number}" if ":" in host else f"{host}:{number}"
        cond = ep.conditions
        ready = (cond is None or cond.ready is not False) and not (cond and cond.terminating)
        out[address] = out.get(address, False) or ready
    return out


class EndpointSliceWatcher:
    """Keeps one stage's ReplicaSet in step with its Service's EndpointSlices."""

    def __init__(
        self,
        stage: str,
        namespace: str,
        service: str,
        port: int | str,
        pool: ReplicaSet,
        api: client.ApiClient,
        *,
        watch_seconds: int = 30,
        backoff: tuple[float, float] = (0.5, 10.0),
    ) -> None:
        """`port`: the Service port's name, or a number; `watch_seconds`: length of one
        watch request (the API server ends it, the client gives up 5 s later); `backoff`:
        first and longest pause between attempts after an API error."""
        self.stage = stage
        self.namespace = namespace
        self.service = service
        self.port = port
        self.pool = pool
        self.api = client.DiscoveryV1Api(api)
        self.watch_seconds = watch_seconds
        self.backoff = backoff
        self._slices: dict[str, client.V1EndpointSlice] = {}
        self._posted: dict[str, bool] | None = None
        self._applied: dict[str, bool] = {}
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.lost = False
        """The API server is unreachable now (the pool keeps what it had)."""

    @property
    def selector(self) -> str:
        return f"{SERVICE_LABEL}={self.service}"

    def start(self) -> None:
        """Starts watching; call on the event loop that owns the pool."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(
            target=self._run, name=f"endpointslices-{self.stage}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Ends the watch: no change reaches the pool after this. The thread itself ends
        when its request returns (at most `watch_seconds` + 5 s), on its own."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    # -- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        pause = self.backoff[0]
        version: str | None = None
        while not self._stop.is_set():
            try:
                if version is None:
                    version = self._list()
                    if self.lost:
                        self.lost = False
                        log.info("%s: the Kubernetes API answers again", self.stage)
                    pause = self.backoff[0]
                version = self._follow(version)
            except ApiException as err:
                if err.status == 410:
                    log.info("%s: EndpointSlice watch expired, listing again", self.stage)
                    version = None
                    continue
                version = None
                pause = self._lost(f"{err.status} {err.reason}", pause)
            except (urllib3.exceptions.HTTPError, OSError) as err:
                version = None
                pause = self._lost(str(err), pause)

    def _lost(self, why: str, pause: float) -> float:
        if not self.lost:
            self.lost = True
            log.warning(
                "%s: lost the Kubernetes API watching EndpointSlices of %s/%s (%s); "
                "keeping the %d replicas known, retrying with back-off",
                self.stage,
                self.namespace,
                self.service,
                why,
                len(self.pool.replicas),
            )
        else:
            log.debug("%s: Kubernetes API still unreachable (%s)", self.stage, why)
        self._stop.wait(pause)
        return min(pause * 2, self.backoff[1])

    def _list(self) -> str | None:
        listed = self.api.list_namespaced_endpoint_slice(
            self.namespace, label_selector=self.selector, _request_timeout=(5, 30)
        )
        self._slices = {s.metadata.name: s for s in listed.items if self._ours(s)}
        self._post()
        return listed.metadata.resource_version

    def _follow(self, version: str | None) -> str | None:
        """Applies watch events until the stream ends; returns where to resume."""
        stream = watch.Watch().stream(
            self.api.list_namespaced_endpoint_slice,
            self.namespace,
            label_selector=self.selector,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=self.watch_seconds,
            _request_timeout=(5, self.watch_seconds + 5),
        )
        try:
            for event in stream:
                if self._stop.is_set():
                    break
                obj = event["object"]
                version = obj.metadata.resource_version or version
                kind = event["type"]
                if kind == "BOOKMARK" or not self._ours(obj):
                    continue
                if kind == "DELETED":
                    self._slices.pop(obj.metadata.name, None)
                else:
                    self._slices[obj.metadata.name] = obj
                self._post()
        except urllib3.exceptions.ReadTimeoutError:
            # Silent past its time (the server should have ended it): ask again from
            # where it was; an API server that is gone shows itself on the next request.
            pass
        finally:
            stream.close()  # lets go of the HTTP response
        return version

    def _ours(self, eps: client.V1EndpointSlice) -> bool:
        # The API server filters by the label selector already; checking again costs
        # nothing and keeps a slice of another Service out whatever the server does.
        return (eps.metadata.labels or {}).get(SERVICE_LABEL) == self.service

    def _post(self) -> None:
        endpoints: dict[str, bool] = {}
        for eps in self._slices.values():
            for address, ready in endpoints_of(eps, self.port).items():
                endpoints[address] = endpoints.get(address, False) or ready
        if endpoints == self._posted or self._stop.is_set():
            return
        self._posted = endpoints
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._apply, endpoints)

    # -- the event loop --------------------------------------------------------------------------

    def _apply(self, endpoints: dict[str, bool]) -> None:
        if self._stop.is_set():
            return
        for address, ready in endpoints.items():
            if ready:
                self.pool.add(address)
            else:
                self.pool.drain(address)  # never in the pool: nothing happens
        for address in self._applied.keys() - endpoints.keys():
            self.pool.remove(address)
        self._applied = endpoints


def watch_stage(
    pool: StagePool,
    service: ServiceRef,
    *,
    api: client.ApiClient | None = None,
    kubeconfig: str | None = None,
    watch_seconds: int = 30,
) -> EndpointSliceWatcher:
    """Starts finding `pool`'s replicas from `service`; call on the gateway's loop and
    `stop()` the result when the gateway stops. `api` defaults to one from `kubeconfig`
    or, when that is None, from the pod's service account."""
    watcher = EndpointSliceWatcher(
        pool.name,
        service.namespace,
        service.name,
        service.port,
        pool.replicas,
        api or api_client(kubeconfig),
        watch_seconds=watch_seconds,
    )
    watcher.start()
    return watcher
