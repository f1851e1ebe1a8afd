#!/usr/bin/env python3
"""Structural check of docker-compose.local.yml: the topology the README
promises, checked without a Docker engine (scripts/check-deploy.sh runs it
after the compose CLI's own validation, or alone where no CLI can run).

  python3 scripts/check_compose.py [docker-compose.local.yml]

Checks: the services (postgres, redis, migrate, gateway-1..3, relay), the
third gateway only under the `scale` profile; health checks on every
long-running service; named volumes for PostgreSQL and Redis; the migration
step runs `chat-local migrate` and the app waits for it to succeed; the
gateways serve without a relay on distinct published ports; a relay; the
app's environment names the compose services, and every variable it sets is
one the README documents; each gateway's Management API listener is on
loopback and unpublished, and the relay may post only to those listeners;
the Dockerfile builds both binaries. The `cluster` profile (issue 18): six
Redis Cluster nodes (redis:7, cluster-enabled, each announcing its service
name), a one-shot `redis-cli --cluster create` of all six with one replica
each (3 primaries, 3 replicas), and gateways and a relay pointed at a node
with REDIS_CLUSTER=true that wait for it, on ports and management listeners
of their own; everything of the profile starts only with it. Needs PyYAML
(in the venv of scripts/lib/pytools.sh, as a dependency of cfn-lint).
"""

import os
import re
import sys
import urllib.parse

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP_ENV = ["DATABASE_URL", "REDIS_URL", "JWT_SECRET", "BROADCAST_CHANNEL", "MESSAGE_RETENTION",
           "PRESENCE_TTL_SECONDS", "RUST_LOG", "LOG_FORMAT"]
GATEWAYS = ["gateway-1", "gateway-2", "gateway-3"]
LONG_RUNNING = ["postgres", "redis", *GATEWAYS, "relay"]
CLUSTER_NODES = [f"redis-node-{n}" for n in range(1, 7)]
CLUSTER_GATEWAYS = ["cluster-gateway-1", "cluster-gateway-2"]
CLUSTER_APPS = [*CLUSTER_GATEWAYS, "cluster-relay"]
CLUSTER_PROFILE = [*CLUSTER_NODES, "redis-cluster", *CLUSTER_APPS]


def main(path):
    with open(path) as f:
        doc = yaml.safe_load(f)
    problems = []

    def need(cond, msg):
        if not cond:
            problems.append(msg)

    services = doc.get("services") or {}
    for name in ["postgres", "redis", "migrate", *GATEWAYS, "relay", *CLUSTER_PROFILE]:
        need(name in services, f"service {name} is missing")
    if problems:
        return report(path, problems, services)

    def command(name):
        cmd = services[name].get("command") or []
        return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]

    def env(name):
        e = services[name].get("environment") or {}
        if isinstance(e, list):
            e = dict(item.split("=", 1) if "=" in item else (item, "") for item in e)
        return {k: str(v) for k, v in e.items()}

    def depends(name):
        d = services[name].get("depends_on") or {}
        return {k: "service_started" for k in d} if isinstance(d, list) else \
            {k: (v or {}).get("condition", "service_started") for k, v in d.items()}

    # Profiles: everything starts by default except the third gateway and
    # the Redis Cluster topology.
    for name, svc in services.items():
        profiles = svc.get("profiles") or []
        if name == "gateway-3":
            need("scale" in profiles, "gateway-3 must be under the `scale` profile")
        elif name in CLUSTER_PROFILE:
            need(profiles == ["cluster"], f"{name} must be under the `cluster` profile only, has {profiles}")
        else:
            need(not profiles, f"{name} must start by default (no profiles), has {profiles}")

    for name in [*LONG_RUNNING, *CLUSTER_NODES, *CLUSTER_APPS]:
        hc = services[name].get("healthcheck") or {}
        need(hc.get("test") and not hc.get("disable"), f"{name} has no health check")

    # Data survives `down` (without -v): named volumes.
    volumes = doc.get("volumes") or {}
    for name, mount_point in (("postgres", "/var/lib/postgresql/data"), ("redis", "/data")):
        mounts = [str(v) for v in services[name].get("volumes") or []]
        named = [m for m in mounts if m.split(":")[0] in volumes and m.split(":")[1] == mount_point]
        need(named, f"{name} must keep {mount_point} in a named volume")

    need(command("migrate")[-2:] == ["chat-local", "migrate"] or command("migrate") == ["migrate"],
         f"migrate must run `chat-local migrate`, runs {command('migrate')}")
    need(depends("migrate").get("postgres") == "service_healthy", "migrate must wait for a healthy postgres")

    ports = {}
    for name in GATEWAYS:
        cmd = command(name)
        need(cmd[:2] == ["chat-local", "serve"] and "--no-relay" in cmd,
             f"{name} must run `chat-local serve --no-relay`, runs {cmd}")
        listen = cmd[cmd.index("--listen") + 1] if "--listen" in cmd else ""
        need(listen.startswith("0.0.0.0:"), f"{name} must listen on 0.0.0.0:PORT, has {listen!r}")
        ports[name] = listen.rsplit(":", 1)[-1]
    need(len(set(ports.values())) == len(GATEWAYS), f"gateways need distinct ports: {ports}")

    relay = command("relay")
    need(relay in (["relay"], ["chat-local", "relay"]), f"relay must run `relay`, runs {relay}")

    # Published ports reach the gateways: on the gateway itself, or on the
    # service whose network namespace it shares.
    published = {}
    for name, svc in services.items():
        for p in svc.get("ports") or []:
            host, _, container = str(p).rpartition(":")
            published.setdefault(name, set()).add(container.split("/")[0])
    for name, port in ports.items():
        mode = services[name].get("network_mode", "")
        holder = mode.split(":", 1)[1] if mode.startswith("service:") else name
        need(port in published.get(holder, set()), f"{name}'s port {port} is not published (on {holder})")
        if holder != name:
            need("relay" in services and services["relay"].get("network_mode") == mode,
                 "the relay must share the gateways' network namespace (callback URLs use localhost)")

    # The Management API (SigV4) and /metrics stay internal: each gateway
    # puts them on loopback in the shared namespace, on a port nobody
    # publishes, and the relay may post only there.
    all_published = set().union(*published.values()) if published else set()
    management = {}
    for name in GATEWAYS:
        listen = env(name).get("GATEWAY_MANAGEMENT_LISTEN", "")
        host, _, port = listen.rpartition(":")
        need(host == "127.0.0.1",
             f"{name} must set GATEWAY_MANAGEMENT_LISTEN to 127.0.0.1:PORT (internal), has {listen!r}")
        need(port not in all_published, f"{name}'s management port {port} must not be published")
        need(port != ports.get(name), f"{name}'s management port must differ from its client port")
        management[name] = f"http://{listen}/local"
    allowed = set(filter(None, env("relay").get("RELAY_ALLOWED_ENDPOINTS", "").split(",")))
    need(allowed == set(management.values()),
         f"the relay's RELAY_ALLOWED_ENDPOINTS must be exactly the gateways' management endpoints "
         f"{sorted(management.values())}, is {sorted(allowed)}")

    readme_vars = documented_variables()
    instance_ids = set()
    for name in ["migrate", *GATEWAYS, "relay"]:
        e = env(name)
        for key in APP_ENV:
            need(e.get(key), f"{name} must set {key}")
        for key in e:
            need(key in readme_vars, f"{name} sets {key}, which the README does not document")
        db = urllib.parse.urlsplit(e.get("DATABASE_URL", ""))
        need(db.hostname == "postgres", f"{name}: DATABASE_URL must point at the postgres service")
        rd = urllib.parse.urlsplit(e.get("REDIS_URL", ""))
        need(rd.hostname == "redis", f"{name}: REDIS_URL must point at the redis service")
        if name != "migrate":
            need(e.get("INSTANCE_ID"), f"{name} must set its own INSTANCE_ID")
            instance_ids.add(e.get("INSTANCE_ID"))
            deps = depends(name)
            need(deps.get("migrate") == "service_completed_successfully",
                 f"{name} must wait for migrate to complete successfully")
            need(deps.get("redis") == "service_healthy", f"{name} must wait for a healthy redis")
    need(len(instance_ids) == len(GATEWAYS) + 1, f"INSTANCE_IDs must differ: {instance_ids}")

    # The image is built once: one service builds it, the rest use its tag
    # and never try to pull it from a registry.
    builders = [n for n, svc in services.items() if svc.get("build")]
    need(len(builders) == 1, f"exactly one service must build the image, not {builders}")
    if builders:
        tag = services[builders[0]].get("image")
        need(tag, f"{builders[0]} must tag the image it builds")
        for name, svc in services.items():
            if name not in builders and svc.get("image") == tag:
                need(svc.get("pull_policy") == "never",
                     f"{name} uses the built image {tag} and must not pull it (pull_policy: never)")

    check_cluster(services, command, env, depends, need, published, readme_vars, instance_ids)

    dockerfile = os.path.join(os.path.dirname(os.path.abspath(path)), "Dockerfile")
    need(os.path.exists(dockerfile), "Dockerfile is missing")
    if os.path.exists(dockerfile):
        text = open(dockerfile).read()
        need("-p chat-local" in text and "-p chat-relay" in text, "the Dockerfile must build chat-local and relay")
    return report(path, problems, services)


def check_cluster(services, command, env, depends, need, published, readme_vars, instance_ids):
    """The `cluster` profile: 3 primaries and 3 replicas, formed once, and
    the apps on it with REDIS_CLUSTER=true."""
    for name in CLUSTER_NODES:
        svc = services[name]
        cmd = command(name)
        need(str(svc.get("image", "")).startswith("redis:7"), f"{name} must run redis:7")
        need(cmd[:1] == ["redis-server"], f"{name} must run redis-server, runs {cmd}")
        flags = dict(zip(cmd[1::2], cmd[2::2]))
        need(flags.get("--cluster-enabled") == "yes", f"{name} must run with --cluster-enabled yes")
        need(flags.get("--cluster-announce-hostname") == name,
             f"{name} must announce its service name (--cluster-announce-hostname {name})")
        need(flags.get("--cluster-preferred-endpoint-type") == "hostname",
             f"{name} must hand out host names (--cluster-preferred-endpoint-type hostname)")
    init = services["redis-cluster"]
    script = " ".join(command("redis-cluster"))
    need("redis-cli --cluster create" in script, "redis-cluster must run `redis-cli --cluster create`")
    need("--cluster-replicas 1" in script, "redis-cluster must give each primary one replica (--cluster-replicas 1)")
    for name in CLUSTER_NODES:
        need(name in script or "redis-node-$$n" in script, f"redis-cluster must include {name}")
    need(str(init.get("restart", "")) == "no", "redis-cluster is one-shot (restart: \"no\")")
    need(all(depends("redis-cluster").get(n) == "service_healthy" for n in CLUSTER_NODES),
         "redis-cluster must wait for every node to be healthy")

    gateway_ports = {}
    management = set()
    all_published = set().union(*published.values()) if published else set()
    for name in CLUSTER_APPS:
        e = env(name)
        need(e.get("REDIS_CLUSTER") == "true", f"{name} must set REDIS_CLUSTER=true")
        rd = urllib.parse.urlsplit(e.get("REDIS_URL", ""))
        need(rd.hostname in CLUSTER_NODES, f"{name}: REDIS_URL must point at a cluster node, is {rd.geturl()!r}")
        db = urllib.parse.urlsplit(e.get("DATABASE_URL", ""))
        need(db.hostname == "postgres", f"{name}: DATABASE_URL must point at the postgres service")
        for key in APP_ENV:
            need(e.get(key), f"{name} must set {key}")
        for key in e:
            need(key in readme_vars, f"{name} sets {key}, which the README does not document")
        need(e.get("INSTANCE_ID") and e.get("INSTANCE_ID") not in instance_ids,
             f"{name} must set an INSTANCE_ID of its own")
        instance_ids.add(e.get("INSTANCE_ID"))
        deps = depends(name)
        need(deps.get("redis-cluster") == "service_completed_successfully",
             f"{name} must wait for the cluster to be formed (redis-cluster completed successfully)")
        need(deps.get("migrate") == "service_completed_successfully",
             f"{name} must wait for migrate to complete successfully")
        need("redis" not in deps, f"{name} must not wait for the single redis")
    for name in CLUSTER_GATEWAYS:
        cmd = command(name)
        need(cmd[:2] == ["chat-local", "serve"] and "--no-relay" in cmd,
             f"{name} must run `chat-local serve --no-relay`, runs {cmd}")
        listen = cmd[cmd.index("--listen") + 1] if "--listen" in cmd else ""
        port = listen.rsplit(":", 1)[-1]
        need(port in all_published, f"{name}'s port {port} is not published")
        gateway_ports[name] = port
        mlisten = env(name).get("GATEWAY_MANAGEMENT_LISTEN", "")
        host, _, mport = mlisten.rpartition(":")
        need(host == "127.0.0.1" and mport not in all_published,
             f"{name}'s management listener must be on loopback and unpublished, is {mlisten!r}")
        management.add(f"http://{mlisten}/local")
        need(services[name].get("network_mode") == services["relay"].get("network_mode"),
             f"{name} must share the gateways' network namespace")
    others = {command(g)[command(g).index("--listen") + 1].rsplit(":", 1)[-1]
              for g in GATEWAYS if "--listen" in command(g)}
    need(len(set(gateway_ports.values())) == len(CLUSTER_GATEWAYS) and not set(gateway_ports.values()) & others,
         f"the cluster gateways need ports of their own: {gateway_ports}")
    need(command("cluster-relay") in (["relay"], ["chat-local", "relay"]), "cluster-relay must run `relay`")
    allowed = set(filter(None, env("cluster-relay").get("RELAY_ALLOWED_ENDPOINTS", "").split(",")))
    need(allowed == management,
         f"cluster-relay may post only to the cluster gateways' management endpoints {sorted(management)}, "
         f"is {sorted(allowed)}")
    need(env("cluster-relay").get("RELAY_HEALTH_LISTEN", "127.0.0.1:8081")
         != env("relay").get("RELAY_HEALTH_LISTEN", "127.0.0.1:8081"),
         "the two relays share a network namespace: cluster-relay needs its own RELAY_HEALTH_LISTEN")


def documented_variables():
    """Variables in the README's configuration table (`| \\`NAME\\` ...`)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    names = set()
    for line in text.splitlines():
        if line.startswith("| `"):
            names.update(re.findall(r"`([A-Z][A-Z0-9_]+)`", line.split("|")[1]))
    return names


def report(path, problems, services):
    if problems:
        print(f"compose: {path}: {len(problems)} problem(s):")
        for p in problems:
            print(f"  - {p}")
        return 1
    print(f"compose: {os.path.basename(path)} has the documented topology "
          f"({', '.join(services)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "docker-compose.local.yml")))
