"""The image runs a whole cluster with the command lines of the rendered chart.

    ~/.cache/causeway-k8s/venv/bin/python -m unittest charts/causeway/tests/test_image.py

from the repository root, after scripts/k8s-tools.sh and `cargo build --workspace --bins
--locked` (and `cargo build -p causeway-txlog --features testing --example kafka_cluster`).

It builds the image with scripts/image.sh, starts a throwaway Kafka broker (the kafka_cluster
example), renders the chart with `helm template` and runs, with podman, every container of the
rendered objects the way the kubelet would: the container's command, args and env taken as
rendered (downward-API env resolved, `$(VAR)` expanded), its ConfigMap and Secret volumes
materialised from the rendered objects, its PVC as a host directory owned by the chart's
user, its emptyDir as a tmpfs, under the user of its securityContext with a read-only root
filesystem, no capabilities and no-new-privileges. Then the bootstrap hook Job and the
`helm test` pod must succeed, a write and a read through the api-server's port must agree,
and every long-running container must run as the chart's user on a read-only root.

Then what `helm upgrade` does with the chart's hook Jobs (templates/hooks.yaml), in Helm's order
(pre-upgrade hook, the objects' change, post-upgrade hook), on the same running cluster:
1×2 → 1×3 (scale-down Job: nothing; the StatefulSet's new pod cw-store-2 starts; scale-up Job:
the transition to 1×3), then 1×3 → 1×2 (scale-down Job: the transition that drains node 2;
the StatefulSet removes cw-store-2; scale-up Job: nothing), documents read back after every
step. And the cdc service (cdc.enabled with one Kafka feed) delivers a write to its feed.

The internal gRPC links are authenticated with the chart's generated cluster secret: a call
without it, or with another, is refused. All of it runs twice: the second time with
internalTLS.enabled and a Secret of the certificates `causeway admin certs create` makes (each
store pod mounts its ordinal's by its pod-index label, as the kubelet would).

Every container uses the host's network (`--network host`): containers reach the broker on the
host's loopback and the test reaches the containers' ports. The cluster's Service and pod DNS
names are mapped to 127.0.0.1 with --add-host.
"""

import base64
import copy
import json
import os
import pathlib
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.error
import urllib.request
import uuid

import yaml

REPO = pathlib.Path(__file__).resolve().parents[3]
CHART = REPO / "charts" / "causeway"
TOOLS = pathlib.Path.home() / ".cache" / "causeway-k8s"
HELM = TOOLS / "bin" / "helm"
TARGET_DIR = pathlib.Path(
    os.environ.get("CARGO_TARGET_DIR") or pathlib.Path.home() / ".cache" / "causeway-target"
)
KAFKA_CLUSTER = TARGET_DIR / "debug" / "examples" / "kafka_cluster"

IMAGE_REPOSITORY = "localhost/causeway"
IMAGE_TAG = "dev"
IMAGE = f"{IMAGE_REPOSITORY}:{IMAGE_TAG}"
FULLNAME = "cw"
NAMESPACE = "causeway-test"
PARTITIONS = 1
REPLICAS = 2
# The upgrade test goes to 1×3 and back: every store pod it may start gets its ports (and its
# DNS name in every container's /etc/hosts) at set-up.
UPGRADE_REPLICAS = 3
# cluster.transitionTimeout: the scale hook Jobs' --timeout (the chart's default is 30m).
TRANSITION_TIMEOUT = "60s"
# The cdc service's feed (cdc.feeds) and the collection it follows.
CDC_FEED = "notes"
# The store pods come from one StatefulSet template, so they all get the same ports. With
# --network host two pods cannot bind the same port, so the chart renders these sentinel ports
# and each store pod gets its own free ports in their place in its args.
GRPC_SENTINEL = 17600
ADMIN_SENTINEL = 17601

READY_TIMEOUT = 60
BOOTSTRAP_TIMEOUT = 180
CHECK_TIMEOUT = 120
EXEC_TIMEOUT = 30
# A scale hook Job runs within TRANSITION_TIMEOUT plus its wait for live nodes.
HOOK_TIMEOUT = 120
CDC_TIMEOUT = 60

# Environment variables and `$(VAR)` references, as the kubelet expands them: `$$` is a
# literal `$`, a reference to an undefined variable stays as it is.
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_SVC_HOST = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?\.svc\b")
_QUANTITY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def expand(text, env):
    def one(m):
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _VAR_REF.sub(one, text)


def quantity_bytes(q):
    q = str(q)
    for suffix, factor in _QUANTITY.items():
        if q.endswith(suffix):
            return int(q[: -len(suffix)]) * factor
    return int(q)


def free_ports(n):
    """n distinct ports free on every interface (the processes listen on 0.0.0.0)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("0.0.0.0", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def run(cmd, timeout=None, check=True):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd!r} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def http(method, url, body=None, headers=None, timeout=10):
    """(status, headers, body bytes); HTTP errors are answers, not exceptions."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def wait_until(what, probe, timeout=READY_TIMEOUT, interval=0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            if probe():
                return
        except OSError as e:
            last = e
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout} s (last error: {last})")


def tcp_open(port):
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        return True


def http_ok(url):
    try:
        return http("GET", url, timeout=3)[0] == 200
    except (urllib.error.URLError, ConnectionError, socket.timeout):
        return False


class ImageRunsChartTest(unittest.TestCase):
    """A cluster of 1 partition × 2 replicas from the rendered chart, on localhost/causeway:dev,
    its internal links authenticated by the chart's cluster secret."""

    # internalTLS.enabled, with a Secret of certificates from `causeway admin certs create`.
    INTERNAL_TLS = False

    @classmethod
    def setUpClass(cls):
        if shutil.which("podman") is None:
            print(
                "\n" + "!" * 78 + "\n!! test_image: podman is not installed: SKIPPING the image test."
                "\n!! Run scripts/k8s-tools.sh --podman (CI does).\n" + "!" * 78,
                file=sys.stderr,
                flush=True,
            )
            raise unittest.SkipTest("podman is not installed")
        cls.started = time.monotonic()
        cls.run_id = uuid.uuid4().hex[:8]
        cls.containers = []  # names, in start order
        cls.kafka = None
        cls.tmp = pathlib.Path(tempfile.mkdtemp(prefix="causeway-image-test."))
        cls.addClassCleanup(cls._cleanup)
        try:
            cls._set_up()
        except BaseException:
            cls.dump_logs()
            raise

    @classmethod
    def _set_up(cls):
        # The image, from the host's current binaries.
        env = dict(os.environ, CARGO_TARGET_DIR=str(TARGET_DIR))
        p = subprocess.run(
            [str(REPO / "scripts" / "image.sh"), IMAGE], cwd=REPO, env=env,
            capture_output=True, text=True, timeout=900,
        )
        if p.returncode != 0:
            raise AssertionError(f"scripts/image.sh exited {p.returncode}:\n{p.stdout}\n{p.stderr}")

        cls._start_kafka()

        # Ports: the config manager's and the api-server's from the values; the store nodes'
        # replace the sentinels in each store pod's args.
        (cls.cm_port, cls.api_port, cls.cdc_port, *store_ports) = free_ports(3 + 2 * PARTITIONS * UPGRADE_REPLICAS)
        cls.store_ports = {
            f"{FULLNAME}-store-{i}": (store_ports[2 * i], store_ports[2 * i + 1])
            for i in range(PARTITIONS * UPGRADE_REPLICAS)
        }
        cls.values = {
            "fullnameOverride": FULLNAME,
            "image": {"repository": IMAGE_REPOSITORY, "tag": IMAGE_TAG, "pullPolicy": "Never"},
            "cluster": {"partitions": PARTITIONS, "replicas": REPLICAS, "transitionTimeout": TRANSITION_TIMEOUT},
            "kafka": {
                "bootstrapServers": cls.kafka_info["bootstrap_servers"],
                "replicationFactor": int(cls.kafka_info["replication_factor"]),
                "minInsyncReplicas": int(cls.kafka_info["min_insync_replicas"]),
                "topic": f"causeway-image-test-{cls.run_id}",
            },
            "configManager": {"port": cls.cm_port},
            # One api-server. The helm test pod reaches it at the Service's port; with host
            # networking there is no Service to map the port, so the two are the same.
            "api": {"replicas": 1, "port": cls.api_port, "service": {"port": cls.api_port}},
            "store": {
                "ports": {"grpc": GRPC_SENTINEL, "admin": ADMIN_SENTINEL},
                "resources": {"requests": {"cpu": "100m", "memory": "512Mi"}, "limits": {"memory": "512Mi"}},
            },
            # The cdc service with one feed of the collection CDC_FEED to the test's broker.
            "cdc": {
                "enabled": True,
                "port": cls.cdc_port,
                "feeds": [{
                    "name": CDC_FEED,
                    "collections": [CDC_FEED],
                    "sink": {
                        "type": "kafka",
                        "bootstrap_servers": cls.kafka_info["bootstrap_servers"],
                        "topic_prefix": f"cdc-test-{cls.run_id}.",
                    },
                }],
            },
        }
        # Objects the release does not make but the cluster has (an existingSecret).
        cls.existing = {}
        if cls.INTERNAL_TLS:
            cls.values["internalTLS"] = {"enabled": True, "existingSecret": f"{FULLNAME}-internal-tls"}
            cls.existing[("Secret", f"{FULLNAME}-internal-tls")] = cls.internal_tls_secret(f"{FULLNAME}-internal-tls")
        cls.objects = cls.render(cls.values, "install")
        secret = cls.obj("Secret", f"{FULLNAME}-tokens")
        token = (secret.get("stringData") or {}).get("check-token") or base64.b64decode(secret["data"]["check-token"]).decode()
        cls.auth = {"Authorization": f"Bearer {token.strip()}"}

        # The pods, as the controllers would make them.
        cm = cls.obj("StatefulSet", f"{FULLNAME}-config-manager")
        store = cls.obj("StatefulSet", f"{FULLNAME}-store")
        api = cls.obj("Deployment", f"{FULLNAME}-api")
        assert store["spec"]["replicas"] == PARTITIONS * REPLICAS, store["spec"]["replicas"]
        cls.cm_pod = cls.pod(f"{FULLNAME}-config-manager-0", cm)
        cls.store_pods = [cls.store_pod(i, cls.objects) for i in range(PARTITIONS * REPLICAS)]
        cls.api_pod = cls.pod(f"{FULLNAME}-api-{cls.run_id}", api)
        cls.cdc_pod = cls.pod(f"{FULLNAME}-cdc-0", cls.obj("StatefulSet", f"{FULLNAME}-cdc"))
        cls.bootstrap_pod = cls.pod(f"{FULLNAME}-bootstrap-{cls.run_id}", cls.obj("Job", f"{FULLNAME}-bootstrap"))
        check = cls.objects.get(("Pod", f"{FULLNAME}-check"))
        cls.check_pod = cls.pod(f"{FULLNAME}-check", check) if check else None

        # Every *.svc name any container uses resolves to the host's loopback in all of them.
        hosts = set()
        for p in [cls.cm_pod, *cls.store_pods, cls.api_pod, cls.cdc_pod, cls.bootstrap_pod, cls.check_pod]:
            if p:
                for text in p["argv"] + [f"{k}={v}" for k, v in p["env"]]:
                    hosts.update(m.group(0) for m in _SVC_HOST.finditer(text))
        hosts.update(f"{name}.{FULLNAME}-store.{NAMESPACE}.svc" for name in cls.store_ports)
        cls.add_hosts = sorted(hosts)

        # Start order: the config manager, the store nodes, the api-server, the cdc service.
        cls.start(cls.cm_pod)
        wait_until("the config manager's port", lambda: tcp_open(cls.cm_port))
        for p in cls.store_pods:
            cls.start(p)
        for p in cls.store_pods:
            admin = cls.store_ports[p["name"]][1]
            wait_until(f"{p['name']} /healthz", lambda: http_ok(f"http://127.0.0.1:{admin}/healthz"))
        cls.start(cls.api_pod)
        wait_until("the api-server's /healthz", lambda: http_ok(f"http://127.0.0.1:{cls.api_port}/healthz"))
        # The cdc service starts with the others, before the bootstrap, as its StatefulSet would.
        cls.start(cls.cdc_pod)

        # The post-install hook: bootstrap the configuration.
        cls.bootstrap = cls.run_once(cls.bootstrap_pod, BOOTSTRAP_TIMEOUT)
        if cls.bootstrap.returncode != 0:
            raise AssertionError(
                f"the bootstrap Job exited {cls.bootstrap.returncode}:\n{cls.bootstrap.stdout}\n{cls.bootstrap.stderr}"
            )
        for p in cls.store_pods:
            admin = cls.store_ports[p["name"]][1]
            wait_until(f"{p['name']} /readyz", lambda: http_ok(f"http://127.0.0.1:{admin}/readyz"))
        wait_until("the api-server's /readyz", lambda: http_ok(f"http://127.0.0.1:{cls.api_port}/readyz"))
        wait_until("the cdc service's /healthz", lambda: http_ok(f"http://127.0.0.1:{cls.cdc_port}/healthz"))

    # ----------------------------------------------------------------------------------------
    # The rendered objects, as pods and podman command lines.

    @classmethod
    def render(cls, values, label):
        """`helm template` of the chart with values: its objects by (kind, name)."""
        values_file = cls.tmp / f"values-{label}.yaml"
        values_file.write_text(yaml.safe_dump(values))
        rendered = run(
            [str(HELM), "template", FULLNAME, str(CHART), "-f", str(values_file), "--namespace", NAMESPACE],
            timeout=120,
        ).stdout
        (cls.tmp / f"rendered-{label}.yaml").write_text(rendered)
        objects = dict(cls.existing)
        for doc in yaml.safe_load_all(rendered):
            if doc:
                objects[(doc["kind"], doc["metadata"]["name"])] = doc
        return objects

    @classmethod
    def internal_tls_secret(cls, name):
        """The Secret of internalTLS.existingSecret, as the chart's README makes it: the files of
        `causeway admin certs create` for every store node the test may start."""
        out = cls.tmp / "certs"
        ids = PARTITIONS * UPGRADE_REPLICAS
        run([str(TARGET_DIR / "debug" / "causeway"), "admin", "certs", "create", "--out", str(out),
             "--store-nodes", f"0-{ids - 1}"], timeout=60)
        data = {"ca.crt": (out / "ca.pem").read_text()}
        for n in ["config-manager", "api-server", "cdc", "admin", *(f"store-node-{i}" for i in range(ids))]:
            data[f"{n}.crt"] = (out / f"{n}.pem").read_text()
            data[f"{n}.key"] = (out / f"{n}-key.pem").read_text()
        return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NAMESPACE},
                "type": "Opaque", "stringData": data}

    @classmethod
    def store_pod(cls, ordinal, objects):
        """The store StatefulSet's pod of this ordinal, with its own ports."""
        name = f"{FULLNAME}-store-{ordinal}"
        store = cls.obj("StatefulSet", f"{FULLNAME}-store", objects)
        return cls.pod(name, store, ports=cls.store_ports[name], objects=objects)

    @classmethod
    def obj(cls, kind, name, objects=None):
        objects = cls.objects if objects is None else objects
        o = objects.get((kind, name))
        if o is None:
            raise AssertionError(f"the rendered chart has no {kind} {name}: {sorted(objects)}")
        return o

    @classmethod
    def pod(cls, name, workload, ports=None, objects=None, instance=None):
        """The podman view of a pod of workload (StatefulSet, Deployment, Job or Pod) named name:
        its one container's argv, env and podman options. ports: (grpc, admin) in place of the
        sentinels of a store pod. objects: the render its ConfigMaps and Secrets come from
        (default the install's). instance: tells apart the containers of a pod run twice."""
        spec = workload["spec"] if workload["kind"] == "Pod" else workload["spec"]["template"]["spec"]
        assert len(spec["containers"]) == 1, f"{name}: {len(spec['containers'])} containers"
        c = spec["containers"][0]
        assert not spec.get("initContainers"), f"{name} has init containers"

        env = {}
        env_list = []
        for e in c.get("env") or []:
            if "value" in e:
                value = expand(str(e["value"]), env)
            elif "valueFrom" in e and "fieldRef" in e["valueFrom"]:
                fields = {"metadata.name": name, "metadata.namespace": NAMESPACE}
                if workload["kind"] == "StatefulSet":
                    # The label the StatefulSet controller gives each pod: its ordinal.
                    fields["metadata.labels['apps.kubernetes.io/pod-index']"] = name.rsplit("-", 1)[1]
                value = fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
            else:
                raise AssertionError(f"{name}: env {e['name']} has a source the test does not provide: {e}")
            env[e["name"]] = value
            env_list.append((e["name"], value))
        command = [expand(a, env) for a in c.get("command") or []]
        args = [expand(str(a), env) for a in c.get("args") or []]
        if ports:
            replaced = {GRPC_SENTINEL: 0, ADMIN_SENTINEL: 0}

            def port_of(m):
                replaced[int(m.group(1))] += 1
                return ":" + str(ports[0] if int(m.group(1)) == GRPC_SENTINEL else ports[1])

            args = [re.sub(rf":({GRPC_SENTINEL}|{ADMIN_SENTINEL})\b", port_of, a) for a in args]
            assert all(replaced.values()), f"{name}: the sentinel ports are not all in its args {c['args']}"

        sc = {**(spec.get("securityContext") or {}), **(c.get("securityContext") or {})}
        assert sc.get("readOnlyRootFilesystem") is True, f"{name}: {sc}"
        assert sc.get("allowPrivilegeEscalation") is False, f"{name}: {sc}"
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{name}: {sc}"
        user = f"{sc['runAsUser']}:{sc['runAsGroup']}"
        fs_group = (spec.get("securityContext") or {}).get("fsGroup", sc["runAsGroup"])

        opts = []
        pod_dir = cls.tmp / (name + (f"-{instance}" if instance else ""))
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates") or []}
        for m in c.get("volumeMounts") or []:
            v = volumes.get(m["name"])
            sub = m.get("subPath") or (expand(m["subPathExpr"], env) if "subPathExpr" in m else None)
            if v is None:
                assert m["name"] in claims, f"{name}: volume {m['name']} is neither a volume nor a claim"
                # A fresh PVC: a directory of the pod's fsGroup, writable by its user.
                src = pod_dir / "pvc" / m["name"]
                src.mkdir(parents=True, exist_ok=True)
                os.chown(src, int(sc["runAsUser"]), int(fs_group))
                src.chmod(0o2770)
                ro = m.get("readOnly", False)
            elif "emptyDir" in v:
                assert not sub, f"{name}: subPath of an emptyDir"
                size = v["emptyDir"].get("sizeLimit")
                tmpfs = f"{m['mountPath']}:rw,mode=1777" + (f",size={quantity_bytes(size)}" if size else "")
                opts += ["--tmpfs", tmpfs]
                continue
            elif "configMap" in v or "secret" in v:
                if "configMap" in v:
                    src_obj = cls.obj("ConfigMap", v["configMap"]["name"], objects)
                    data = dict(src_obj.get("data") or {})
                    mode = v["configMap"].get("defaultMode", 0o644)
                    items = v["configMap"].get("items")
                else:
                    src_obj = cls.obj("Secret", v["secret"]["secretName"], objects)
                    data = {k: base64.b64decode(x).decode() for k, x in (src_obj.get("data") or {}).items()}
                    data.update(src_obj.get("stringData") or {})
                    mode = v["secret"].get("defaultMode", 0o644)
                    items = v["secret"].get("items")
                files = {it["path"]: data[it["key"]] for it in items} if items else data
                src = pod_dir / "volumes" / m["name"]
                src.mkdir(parents=True, exist_ok=True)
                src.chmod(0o755)
                for path, content in files.items():
                    f = src / path
                    f.parent.mkdir(parents=True, exist_ok=True)
                    f.write_text(content)
                    # As the kubelet makes them: owned by root, group the pod's fsGroup.
                    os.chown(f, 0, int(fs_group))
                    f.chmod(mode)
                ro = True
            else:
                raise AssertionError(f"{name}: volume {m['name']} of a kind the test does not make: {v}")
            if sub:
                src = src / sub
                assert src.exists(), f"{name}: subPath {sub} of {m['name']} does not exist"
            opts += ["--volume", f"{src}:{m['mountPath']}:{'ro' if ro else 'rw'}"]

        limit = ((c.get("resources") or {}).get("limits") or {}).get("memory")
        if limit:
            opts += ["--memory", str(quantity_bytes(limit))]
        assert c["image"] == IMAGE, f"{name}: image {c['image']}"
        return {
            "name": name,
            "container": f"causeway-image-test-{cls.run_id}-{name}" + (f"-{instance}" if instance else ""),
            "image": c["image"],
            "pull": {"Never": "never", "IfNotPresent": "missing", "Always": "always"}[c.get("imagePullPolicy", "IfNotPresent")],
            "user": user,
            "uid": int(sc["runAsUser"]),
            "command": command,
            "args": args,
            "argv": command + args,
            "env": env_list,
            "opts": opts,
        }

    @classmethod
    def podman_run(cls, p, detach):
        cmd = ["podman", "run", "--name", p["container"], "--network", "host", "--read-only",
               # Only what the pod mounts is writable, as with readOnlyRootFilesystem (podman
               # would otherwise put tmpfs on /tmp, /run and /var/tmp).
               "--read-only-tmpfs=false",
               "--user", p["user"], "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
               "--pull", p["pull"]]
        if detach:
            cmd.append("-d")
        for h in cls.add_hosts:
            cmd += ["--add-host", f"{h}:127.0.0.1"]
        for k, v in p["env"]:
            cmd += ["--env", f"{k}={v}"]
        cmd += p["opts"]
        if p["command"]:
            cmd += ["--entrypoint", json.dumps(p["command"])]
        cmd += [p["image"], *p["args"]]
        return cmd

    @classmethod
    def start(cls, p):
        cls.containers.append(p["container"])
        run(cls.podman_run(p, detach=True), timeout=60)

    @classmethod
    def run_once(cls, p, timeout):
        """Runs a Job's or a test pod's container to its end; its CompletedProcess."""
        cls.containers.append(p["container"])
        try:
            return subprocess.run(cls.podman_run(p, detach=False), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"{p['name']} did not end within {timeout} s:\n{e.stdout}\n{e.stderr}") from None

    # ----------------------------------------------------------------------------------------
    # Diagnosis and clean-up.

    @classmethod
    def dump_logs(cls):
        for name in getattr(cls, "containers", []):
            p = subprocess.run(["podman", "logs", name], capture_output=True, text=True)
            print(f"\n----- podman logs {name} -----\n{p.stdout}{p.stderr}", file=sys.stderr)
        if getattr(cls, "kafka", None) is not None:
            print(f"----- kafka_cluster: {cls.kafka_info}", file=sys.stderr)
        sys.stderr.flush()

    @classmethod
    def _start_kafka(cls):
        if not KAFKA_CLUSTER.exists():
            raise AssertionError(
                f"{KAFKA_CLUSTER} is missing: cargo build -p causeway-txlog --features testing --example kafka_cluster"
            )
        cls.kafka = subprocess.Popen([str(KAFKA_CLUSTER)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        cls.kafka_info = {}
        buf = b""
        deadline = time.monotonic() + 120
        while "min_insync_replicas" not in cls.kafka_info:
            left = deadline - time.monotonic()
            if left <= 0 or cls.kafka.poll() is not None:
                raise AssertionError(f"kafka_cluster did not start: {cls.kafka_info} {buf!r}")
            ready, _, _ = select.select([cls.kafka.stdout], [], [], left)
            if ready:
                chunk = os.read(cls.kafka.stdout.fileno(), 4096)
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    k, _, v = line.decode().partition("=")
                    cls.kafka_info[k] = v

    @classmethod
    def _cleanup(cls):
        for name in reversed(cls.containers):
            subprocess.run(["podman", "rm", "-f", "-t", "5", name], capture_output=True)
        if cls.kafka is not None and cls.kafka.poll() is None:
            cls.kafka.send_signal(signal.SIGTERM)
            try:
                cls.kafka.wait(timeout=15)
            except subprocess.TimeoutExpired:
                cls.kafka.kill()
                cls.kafka.wait(timeout=15)
        shutil.rmtree(cls.tmp, ignore_errors=True)
        print(f"\ntest_image: {time.monotonic() - cls.started:.0f} s in all", file=sys.stderr)

    def run(self, result=None):
        # Every failure comes with the containers' logs.
        failures = len(result.failures) + len(result.errors) if result else 0
        out = super().run(result)
        if result and len(result.failures) + len(result.errors) > failures:
            self.dump_logs()
        return out

    # ----------------------------------------------------------------------------------------
    # What the checks use: the document API, the cluster's configuration, the hook Jobs.

    def doc_url(self, collection, key):
        return f"http://127.0.0.1:{self.api_port}/v1/collections/{collection}/documents/{key}"

    def put(self, collection, key, doc):
        """Writes doc through the api-server with the chart's token; its commit ts."""
        status, headers, body = http("PUT", self.doc_url(collection, key), doc, self.auth)
        self.assertEqual(status, 200, body)
        ts = json.loads(body)["ts"]
        self.assertEqual(headers.get("Causeway-Timestamp"), str(ts))
        return ts

    def write_then_read(self, collection, key):
        doc = {"run": self.run_id, "n": 7, "nested": {"list": [1, "two", None]}}
        ts = self.put(collection, key, doc)
        status, headers, body = http("GET", self.doc_url(collection, key), headers={**self.auth, "Causeway-After": str(ts)})
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body), doc)
        self.assertEqual(headers.get("ETag"), f'"{ts}"')

    def assert_read_back(self, docs, after, step):
        """Every document of docs ({(collection, key): doc}) reads back as written, from a
        snapshot at or after ts after (Causeway-After)."""
        for (collection, key), doc in docs.items():
            status, _, body = http("GET", self.doc_url(collection, key), headers={**self.auth, "Causeway-After": str(after)})
            self.assertEqual(status, 200, f"{step}: {collection}/{key}: {body!r}")
            self.assertEqual(json.loads(body), doc, f"{step}: {collection}/{key}")

    def admin_status(self, *credentials, check=True):
        """`causeway admin status --json` (one sample) with these flags, run in the config
        manager's container, whose /etc/hosts resolves the addresses the nodes registered."""
        return run(["podman", "exec", self.cm_pod["container"], "causeway", "admin", "status", "--json",
                    "--sample-ms", "0", "--config-manager", f"127.0.0.1:{self.cm_port}", *credentials],
                   timeout=EXEC_TIMEOUT, check=check)

    def credentials(self):
        """The flags of an admin command with the credentials the chart mounts in the config
        manager's pod: its certificate under TLS, else the cluster secret."""
        security = json.loads(self.obj("ConfigMap", f"{FULLNAME}-config-manager")["data"]["config-manager.json"])["security"]
        tls = security.get("tls")
        if tls:
            return ["--tls-ca", tls["ca"], "--tls-cert", tls["cert"], "--tls-key", tls["key"]]
        return ["--cluster-secret-file", security["cluster_secret_file"]]

    def cluster_status(self):
        """admin_status with the config manager's credentials."""
        return json.loads(self.admin_status(*self.credentials()).stdout)

    def assert_configuration(self, nodes, step):
        """The cluster is idle in PARTITIONS × len(nodes) with exactly these node ids, every one
        healthy; its status."""
        s = self.cluster_status()
        shown = json.dumps(s, indent=1)
        self.assertIsNone(s["next_epoch"], f"{step}: a transition runs:\n{shown}")
        self.assertEqual(len(s["partitions"]), PARTITIONS, f"{step}:\n{shown}")
        replicas = [r for part in s["partitions"] for r in part["replicas"]]
        self.assertEqual(sorted(r["node"] for r in replicas), nodes, f"{step}: the nodes of the configuration:\n{shown}")
        self.assertEqual({r["health"] for r in replicas}, {"ok"}, f"{step}:\n{shown}")
        return s

    def render_upgrade(self, installed, replicas):
        """The objects `helm upgrade --set cluster.replicas=<replicas>` applies over the release
        rendered as installed, checked to differ from it only in the store StatefulSet's replicas
        and the hook Jobs' shape, so no running pod is restarted by the upgrade."""
        values = copy.deepcopy(self.values)
        values["cluster"]["replicas"] = replicas
        objects = self.render(values, f"replicas-{replicas}")
        # The generated token, cluster secret and admin token are kept across upgrades by
        # `lookup` (templates/auth-secret.yaml, templates/cluster-secret.yaml), which `helm
        # template` cannot do: the release's Secrets stay.
        for kept in (("Secret", f"{FULLNAME}-tokens"), ("Secret", f"{FULLNAME}-cluster")):
            objects[kept] = installed[kept]
        changed = sorted(k for k in objects.keys() | installed.keys() if objects.get(k) != installed.get(k))
        self.assertEqual(changed, [
            ("Job", f"{FULLNAME}-bootstrap"),  # a post-install hook: not run by an upgrade
            ("Job", f"{FULLNAME}-scale-down"),
            ("Job", f"{FULLNAME}-scale-up"),
            ("StatefulSet", f"{FULLNAME}-store"),
        ])
        store = copy.deepcopy(self.obj("StatefulSet", f"{FULLNAME}-store", installed))
        store["spec"]["replicas"] = PARTITIONS * replicas
        self.assertEqual(self.obj("StatefulSet", f"{FULLNAME}-store", objects), store)
        return objects

    def run_hook(self, objects, job, instance):
        """Runs the hook Job cw-<job> of the render objects to its end; expects exit 0; its
        stdout."""
        p = self.pod(f"{FULLNAME}-{job}-{self.run_id}-{instance}", self.obj("Job", f"{FULLNAME}-{job}", objects), objects=objects)
        self.assertIn(f"--replicas={objects[('StatefulSet', f'{FULLNAME}-store')]['spec']['replicas'] // PARTITIONS}", p["args"])
        result = self.run_once(p, HOOK_TIMEOUT)
        if result.returncode != 0:
            self.fail(
                f"the {job} Job ({instance}) exited {result.returncode}: {p['args']}\n{result.stdout}\n"
                f"{result.stderr[-3000:]}\n{self.transition_diagnosis()}"
            )
        return result.stdout

    def transition_diagnosis(self):
        """What a transition may wait for: the nodes' phases, their active reads (a read of the
        old epoch holds the install back; a cdc feed's GC hold is one), the cdc feeds."""
        lines = []
        try:
            s = self.cluster_status()
            lines.append(f"status: epoch {s['epoch']} next {s['next_epoch']} phases {s['phases']} ust {s['ust']} gc {s['gc']}")
        except AssertionError as e:
            lines.append(f"status: {e}")
        for name, (_, admin) in self.store_ports.items():
            try:
                metrics = http("GET", f"http://127.0.0.1:{admin}/metrics", timeout=3)[2].decode()
                reads = re.search(r"(?m)^causeway_store_active_reads (\S+)", metrics)
                lines.append(f"{name}: causeway_store_active_reads {reads.group(1) if reads else '?'}")
            except (OSError, urllib.error.URLError):
                pass
        try:
            lines.append(f"cdc /v1/feeds: {http('GET', f'http://127.0.0.1:{self.cdc_port}/v1/feeds', timeout=3)[2].decode()}")
        except (OSError, urllib.error.URLError) as e:
            lines.append(f"cdc /v1/feeds: {e}")
        return "\n".join(lines)

    def run_check_pod(self, objects, instance=None):
        check = objects.get(("Pod", f"{FULLNAME}-check"))
        if check is None:
            tests = sorted(str(f.relative_to(CHART)) for f in (CHART / "templates" / "tests").glob("*.yaml"))
            self.fail(
                f"the rendered chart has no helm test pod (Pod {FULLNAME}-check); test templates on disk: "
                f"{tests}. helm skips files that charts/causeway/.helmignore matches (a pattern without "
                f"a leading / matches at any depth)."
            )
        p = self.pod(f"{FULLNAME}-check", check, objects=objects, instance=instance)
        result = self.run_once(p, CHECK_TIMEOUT)
        out = result.stdout + result.stderr
        self.assertEqual(result.returncode, 0, out)
        # One line per step: "<step>  ok  <latency>  <detail>".
        for step in ("ready", "write", "read", "delete", "gone"):
            self.assertRegex(result.stdout, rf"(?m)^{step}\s+ok\s", out)

    # ----------------------------------------------------------------------------------------
    # The checks.

    def test_bootstrap_job(self):
        self.assertEqual(self.bootstrap.returncode, 0, self.bootstrap.stdout + self.bootstrap.stderr)

    def test_helm_test_pod(self):
        self.run_check_pod(self.objects)

    def test_write_then_read_through_the_api(self):
        self.write_then_read("image_test", f"doc-{self.run_id}")

    def test_internal_links_refuse_calls_without_the_cluster_secret(self):
        """The chart's processes serve gRPC on every address, authenticated: a call without the
        cluster secret (or, under TLS, without a certificate of the cluster CA), or with another
        secret, is refused; with the mounted credentials it passes."""
        self.assertGreaterEqual(self.cluster_status()["epoch"], 1)
        refused = self.admin_status(check=False)
        self.assertNotEqual(refused.returncode, 0, refused.stdout)
        if self.INTERNAL_TLS:
            # The cluster secret alone does not pass either.
            secret = json.loads(self.obj("ConfigMap", f"{FULLNAME}-config-manager")["data"]["config-manager.json"])["security"]["cluster_secret_file"]
            plain = self.admin_status("--cluster-secret-file", secret, check=False)
            self.assertNotEqual(plain.returncode, 0, plain.stdout)
            return
        self.assertIn("cluster secret", refused.stderr)
        # Another secret, in the config manager's volume (its only writable place).
        other = "/var/lib/causeway/other-secret"
        run(["podman", "exec", self.cm_pod["container"], "sh", "-c", f"echo {'x' * 32} > {other}"], timeout=EXEC_TIMEOUT)
        forged = self.admin_status("--cluster-secret-file", other, check=False)
        self.assertNotEqual(forged.returncode, 0, forged.stdout)
        self.assertIn("cluster secret", forged.stderr)

    def test_containers_run_as_the_chart_user_on_a_read_only_root(self):
        pods = [self.cm_pod, *self.store_pods, self.api_pod, self.cdc_pod]
        for p in pods:
            with self.subTest(pod=p["name"]):
                c = p["container"]
                state = json.loads(run(["podman", "inspect", c]).stdout)[0]
                self.assertTrue(state["State"]["Running"], f"{p['name']} is not running")
                self.assertIs(state["HostConfig"]["ReadonlyRootfs"], True)
                status = pathlib.Path(f"/proc/{state['State']['Pid']}/status").read_text()
                uids = re.search(r"(?m)^Uid:\s+(.*)$", status).group(1).split()
                self.assertEqual(uids, [str(p["uid"])] * 4, status)
                # touch is in the image (coreutils of debian:bookworm-slim).
                self.assertEqual(run(["podman", "exec", c, "test", "-x", "/usr/bin/touch"], check=False).returncode, 0)
                w = run(["podman", "exec", c, "touch", "/x"], timeout=EXEC_TIMEOUT, check=False)
                self.assertNotEqual(w.returncode, 0, "writing to / succeeded")
                self.assertIn("Read-only file system", w.stderr)

    def test_cdc_feed_of_the_chart_runs_and_delivers_a_write(self):
        """The feed of cdc.feeds is listed by the cdc service's /v1/feeds, running, and resolved
        past a write to its collection (every event at or below `resolved` is in Kafka)."""
        ts = self.put(CDC_FEED, f"cdc-{self.run_id}", {"run": self.run_id, "text": "to the feed"})
        url = f"http://127.0.0.1:{self.cdc_port}/v1/feeds"
        seen = {}

        def delivered():
            try:
                status, _, body = http("GET", url, timeout=3)
            except OSError as e:
                seen["answer"] = e
                return False
            seen["answer"] = (status, body)
            if status != 200:
                return False
            feed = {f["spec"]["name"]: f for f in json.loads(body)["feeds"]}.get(CDC_FEED)
            seen["feed"] = feed
            return (
                feed is not None
                and feed["status"]["state"] == "running"
                and feed["status"]["resolved"] >= ts
                and feed["events"] >= 1
            )

        deadline = time.monotonic() + CDC_TIMEOUT
        while not delivered():
            if time.monotonic() > deadline:
                self.fail(f"feed {CDC_FEED}: not running and resolved past ts {ts} within {CDC_TIMEOUT} s: {seen}")
            time.sleep(0.5)
        feed = seen["feed"]
        self.assertEqual(feed["spec"]["collections"], [CDC_FEED])
        self.assertEqual(feed["spec"]["sink"]["type"], "kafka")
        self.assertFalse(feed["paused"])
        self.assertIsNone(feed["status"]["last_error"])

    def test_helm_upgrade_to_1x3_and_back_to_1x2_runs_the_scale_hooks_in_helms_order(self):
        """helm upgrade runs the pre-upgrade hook (scale-down Job), applies the objects (the
        store StatefulSet's pods follow its replicas), then the post-upgrade hook (scale-up
        Job). Each step in that order, with documents read back after each. The cdc service
        (and its feed's GC hold) runs throughout, as it does in a release with cdc.enabled."""
        collection = "upgrade_test"
        docs, after = {}, 0

        def write(prefix, n):
            nonlocal after
            for i in range(n):
                doc = {"run": self.run_id, "written": prefix, "i": i}
                after = max(after, self.put(collection, f"{prefix}-{i}", doc))
                docs[(collection, f"{prefix}-{i}")] = doc

        def read_back(step):
            self.assert_read_back(docs, after, step)

        write("at-1x2", 10)
        installed = self.assert_configuration([0, 1], "before the upgrades")

        # 1. helm upgrade --set cluster.replicas=3.
        up = self.render_upgrade(self.objects, UPGRADE_REPLICAS)
        # pre-upgrade: 1×3 needs no fewer nodes, so the scale-down Job leaves it for later.
        out = self.run_hook(up, "scale-down", "to-1x3")
        self.assertIn("left for later", out)
        s = self.assert_configuration([0, 1], "1×2 → 1×3, after the pre-upgrade hook")
        self.assertEqual(s["epoch"], installed["epoch"], "the pre-upgrade hook changed the configuration")
        read_back("1×2 → 1×3, after the pre-upgrade hook")
        # The StatefulSet grows: its new pod cw-store-2 starts and registers as a spare.
        store_2 = self.store_pod(2, up)
        self.start(store_2)
        admin_2 = self.store_ports[store_2["name"]][1]
        wait_until("cw-store-2 /healthz", lambda: http_ok(f"http://127.0.0.1:{admin_2}/healthz"))
        wait_until("cw-store-2 a registered spare", lambda: 2 in self.cluster_status()["spares"])
        read_back("1×2 → 1×3, with cw-store-2 started")
        # post-upgrade: the scale-up Job proposes 1×3 and waits for its install.
        out = self.run_hook(up, "scale-up", "to-1x3")
        self.assertIn("installed", out)
        at_1x3 = self.assert_configuration([0, 1, 2], "1×2 → 1×3, after the post-upgrade hook")
        self.assertGreater(at_1x3["epoch"], installed["epoch"])
        wait_until("cw-store-2 /readyz", lambda: http_ok(f"http://127.0.0.1:{admin_2}/readyz"))
        read_back("1×2 → 1×3, after the post-upgrade hook")
        # Documents node 2 holds as a replica, for the way back.
        write("at-1x3", 5)
        read_back("at 1×3")

        # 2. helm upgrade --set cluster.replicas=2.
        down = self.render_upgrade(up, REPLICAS)
        # pre-upgrade: 1×2 needs fewer nodes: the scale-down Job drains the highest id, node 2,
        # the ordinal the StatefulSet removes next.
        out = self.run_hook(down, "scale-down", "to-1x2")
        self.assertIn("installed", out)
        at_1x2 = self.assert_configuration([0, 1], "1×3 → 1×2, after the pre-upgrade hook")
        self.assertGreater(at_1x2["epoch"], at_1x3["epoch"])
        wait_until("node 2 drained", lambda: self.cluster_status()["drained"] == [2])
        read_back("1×3 → 1×2, after the pre-upgrade hook")
        # The StatefulSet shrinks: it removes cw-store-2.
        run(["podman", "rm", "-f", "-t", "5", store_2["container"]], timeout=60)
        read_back("1×3 → 1×2, with cw-store-2 removed")
        # post-upgrade: the scale-up Job has nothing to do.
        out = self.run_hook(down, "scale-up", "to-1x2")
        self.assertIn("already", out)
        s = self.assert_configuration([0, 1], "1×3 → 1×2, after the post-upgrade hook")
        self.assertEqual(s["epoch"], at_1x2["epoch"], "the post-upgrade hook changed the configuration")
        # helm test, and the API, on the release after both upgrades.
        self.run_check_pod(down, instance="after-upgrades")
        self.write_then_read("image_test", f"doc-{self.run_id}-after-upgrades")
        read_back("after the upgrades")

class ImageRunsChartWithInternalTLSTest(ImageRunsChartTest):
    """The same cluster and checks with internalTLS.enabled: every process, and the hook Jobs,
    with its certificate of the cluster CA from the Secret; each store pod with its ordinal's."""

    INTERNAL_TLS = True


if __name__ == "__main__":
    unittest.main()
