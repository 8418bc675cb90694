"""`onerec serve`: run the HTTP bridge in front of serving replicas that already run on a Ray cluster.

Invariant: the bridge only attaches: it finds the replicas `onerec run` started (named actors
`<namespace>-replica-<n>` in the Ray namespace `stream.namespace`) and never starts or stops them,
so several bridges can front the same replicas (behind a load balancer) and restart independently.

    onerec serve --set loop.ray_address=auto --set stream.bootstrap_servers=kafka-1:9092 --set serve.bridge_port=8311
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

import ray

from serving_bridge.app import ServingBridge, UserViews, bound_port, make_app, start_site


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=None, help="listen port (default: serve.bridge_port)")
    parser.add_argument("--host", default=None, help="listen address (default: serve.bridge_host)")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for replicas to appear")


def find_replicas(namespace: str) -> list:
    """Handles of the live replica actors of `namespace` (named `<namespace>-replica-<n>`)."""
    from ray.util import list_named_actors

    names = [a["name"] for a in list_named_actors(all_namespaces=True)
             if a.get("namespace") == namespace and a["name"].startswith(f"{namespace}-replica-")]
    return [ray.get_actor(name, namespace=namespace) for name in sorted(names)]


async def serve(cfg, *, host: str, port: int, wait_s: float) -> int:
    loop = asyncio.get_running_loop()
    replicas = []
    deadline = loop.time() + wait_s
    while not replicas:
        replicas = find_replicas(cfg.stream.namespace)
        if replicas:
            break
        if loop.time() > deadline:
            print(f"onerec serve: no replicas named {cfg.stream.namespace}-replica-* on the cluster "
                  f"(start them with `onerec run`)", file=sys.stderr)
            return 1
        await asyncio.sleep(1.0)
    from simulator import embedded   # the embedded world's catalogue and user views; a platform passes its own

    views = UserViews(embedded.user_views(short_len=cfg.model.max_short, long_len=cfg.model.max_long),
                      embedded.item_catalogue().duration_of)
    bridge = ServingBridge.from_config(cfg, replicas, views=views)
    runner = await start_site(make_app(bridge), host, port)
    print(f"bridge: http://{host}:{bound_port(runner)} in front of {len(replicas)} replicas", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        while not stop.is_set():   # pick up replicas the driver replaced
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 5.0)
            known = {h._actor_id for h in bridge.pool.handles}
            for handle in find_replicas(cfg.stream.namespace):
                if handle._actor_id not in known:
                    bridge.pool.add(handle)
    finally:
        await runner.cleanup()
    return 0


def main(args: argparse.Namespace, cfg) -> int:
    ray.init(address=cfg.loop.ray_address or "auto", namespace=cfg.stream.namespace, log_to_driver=False)
    try:
        return asyncio.run(serve(cfg, host=args.host or cfg.serve.bridge_host,
                                 port=cfg.serve.bridge_port if args.port is None else args.port, wait_s=args.wait))
    finally:
        ray.shutdown()
