"""`ditmesh up --metrics-port BASE`: one base, a fixed port per process, each serving its own
service's Prometheus metrics; the stages a local autoscaler starts get none.

The argument tests stand in for the processes (no child is started); the slow one runs `up`
on a tiny model and scrapes each port after a request.
"""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ditmesh.client import Client
from ditmesh.local import LocalMesh, UpConfig, metrics_ports

from .helpers import UpProcess


def test_ports_follow_the_base():
    assert metrics_ports(9100) == {
        ("gateway", 0): 9100,
        ("encoder", 0): 9101,
        ("denoiser", 0): 9102,
        ("vae", 0): 9103,
    }
    extra = metrics_ports(9100, denoiser_replicas=3)
    assert extra[("denoiser", 1)] == 9104 and extra[("denoiser", 2)] == 9105
    assert len(set(extra.values())) == len(extra) == 6


def test_a_base_out_of_range_is_refused():
    with pytest.raises(ValueError, match="0..65535"):
        UpConfig(model="m", metrics_port=-1)
    with pytest.raises(ValueError, match="up to 65537"):
        UpConfig(model="m", metrics_port=65532, denoiser_replicas=3)
    UpConfig(model="m", metrics_port=65532)  # its four processes fit


def test_a_bad_base_is_one_line(capsys):
    from ditmesh.cli import main

    assert main(["up", "--model", "unused", "--metrics-port", "65533"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --metrics-port must be 0..65532; got 65533")


class _Started:
    """Stands in for StageProcess: notes what it was started with, is at once listening."""

    def __init__(self, stage, args, env, **_kw) -> None:
        self.stage, self.args = stage, args
        _Started.log.append(self)

    def wait_listening(self, timeout, abort=None) -> str:
        return "127.0.0.1:1"

    def terminate(self) -> None:
        pass

    def wait(self, timeout) -> int:
        return 0

    log: list[_Started] = []


def _start(monkeypatch, **config) -> list[_Started]:
    import ditmesh.local as local

    _Started.log = []
    monkeypatch.setattr(local, "StageProcess", _Started)
    monkeypatch.setattr(local, "wait_healthy", lambda *a, **kw: None)
    mesh = LocalMesh(UpConfig(model="m", **config))
    mesh.start()
    mesh.stop()
    return _Started.log


def _flag(args: list[str], name: str) -> list[str]:
    return [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]


def test_each_process_gets_its_port(monkeypatch):
    started = _start(monkeypatch, metrics_port=9100, denoiser_replicas=2)
    ports = [(p.stage, _flag(p.args, "--metrics-port")) for p in started]
    assert ports == [
        ("encoder", ["9101"]),
        ("denoiser", ["9102"]),
        ("denoiser", ["9104"]),
        ("vae", ["9103"]),
        ("gateway", ["9100"]),
    ]


def test_no_base_no_metrics_flag(monkeypatch):
    started = _start(monkeypatch)
    assert len(started) == 4
    assert not any(a.startswith("--metrics-port") for p in started for a in p.args)


def test_stages_a_local_autoscaler_starts_get_none(monkeypatch):
    (gateway,) = _start(monkeypatch, metrics_port=9100, autoscale_local=True)
    assert _flag(gateway.args, "--metrics-port") == ["9100"]
    local_stages = _flag(gateway.args, "--local-stage")
    assert [s.split("=", 1)[0] for s in local_stages] == ["encoder", "denoiser", "vae"]
    assert not any("metrics-port" in s for s in local_stages), local_stages


def _free_base() -> int:
    """A base whose four ports are free now (another process may still take one: rare)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + 3 > 65535:
            continue
        try:
            socks = []
            for port in range(base, base + 4):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no four consecutive free ports found")


def _ditmesh_samples(port: int) -> list:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return [
        s
        for family in text_string_to_metric_families(text)
        if family.name.startswith("ditmesh_")
        for s in family.samples
    ]


@pytest.mark.slow  # `ditmesh up`: four processes
def test_up_serves_each_services_metrics_on_its_port(tiny_flux):
    base = _free_base()
    mesh = UpProcess(tiny_flux, "--metrics-port", str(base))
    try:
        with Client(mesh.address, timeout=120) as client:
            client.generate("a red circle", height=64, width=64, steps=2, seed=0)
        for offset, service in enumerate(("gateway", "encoder", "denoiser", "vae")):
            samples = _ditmesh_samples(base + offset)
            # Only its own service's: every stage label there names it.
            stages = {s.labels["stage"] for s in samples if "stage" in s.labels}
            if service == "gateway":
                assert "gateway" in stages, stages
                names = {s.name for s in samples}
                assert "ditmesh_gateway_requests_total" in names, sorted(names)
                assert {"encoder", "denoiser", "vae"} >= stages - {"gateway"}  # its pools
            else:
                assert stages == {service}, (service, stages)
            busy = [s for s in samples if s.name == "ditmesh_busy_seconds_total"]
            assert [s.labels["stage"] for s in busy] == [service]
            served = [
                s.value
                for s in samples
                if s.name == "ditmesh_requests_total" and s.labels.get("code") == "OK"
            ]
            assert sum(served) >= 1, (service, served)
    finally:
        code = mesh.stop()
    assert code == 0, "".join(mesh.stderr[-40:])
