"""Checks of the Helm chart with the real tools (scripts/k8s-tools.sh installs them):

- `helm lint --strict` and `helm template` of every values file under ci/;
- `kubernetes-validate --strict` of every rendered manifest for each Kubernetes version from 1.29
  to the newest the validator ships;
- trivy and checkov: no finding of high or critical severity, and every lower one accepted in
  the chart README with its reason;
- an upgrade changes no immutable field of a StatefulSet;
- values.schema.json refuses bad values;
- the README's table of values is the one tests/values_doc.py makes;
- the hook Jobs drive the shape, and the alerts name metrics that exist.

    ~/.cache/causeway-k8s/venv/bin/python -m unittest discover -s charts/causeway/tests -p 'test_chart.py'
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import unittest

import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import values_doc  # noqa: E402

CHART = pathlib.Path(__file__).resolve().parent.parent
REPO = CHART.parent.parent
TOOLS = pathlib.Path(os.environ.get("CAUSEWAY_K8S_TOOLS", pathlib.Path.home() / ".cache/causeway-k8s"))
HELM = str(TOOLS / "bin/helm")
NAMESPACE = "causeway"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))


def run(*argv, check=True, timeout=300):
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def render(*values_args):
    out = run(HELM, "template", "rel", str(CHART), "--namespace", NAMESPACE, *values_args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs, kind):
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def accepted_findings():
    """The README's table of accepted findings: check id → reason."""
    readme = (CHART / "README.md").read_text()
    section = readme.split("## Accepted findings", 1)[1].split("\n## ", 1)[0]
    found = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*`([A-Z0-9_-]+)`\s*\|[^|]*\|\s*(.+?)\s*\|\s*$", line)
        if m:
            found[m.group(1)] = m.group(2)
    return found


def security_files(docs):
    """Each workload's `security` files (of its --config JSON, or of a hook Job's CAUSEWAY_*
    variables), each as the (Secret, key) it is mounted from: {workload: {field: (secret, key)}}.
    A key mounted by subPathExpr is given as the expression."""
    found = {}
    for d in docs:
        if d["kind"] not in ("StatefulSet", "Deployment", "Job"):
            continue
        spec = d["spec"]["template"]["spec"]
        container = spec["containers"][0]
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        mounts = container.get("volumeMounts") or []

        def source(path):
            """The (kind, name, key) the file at path comes from."""
            for m in mounts:
                v = volumes.get(m["name"])
                if v is None:
                    continue
                kind, ref = ("Secret", v["secret"]) if "secret" in v else ("ConfigMap", v.get("configMap"))
                if ref is None:
                    continue
                name = ref.get("secretName") or ref.get("name")
                if m["mountPath"] == path:
                    return kind, name, m.get("subPath") or m.get("subPathExpr")
                if path.startswith(m["mountPath"].rstrip("/") + "/") and not (m.get("subPath") or m.get("subPathExpr")):
                    rel = path[len(m["mountPath"].rstrip("/")) + 1:]
                    items = {it["path"]: it["key"] for it in ref.get("items") or []}
                    return kind, name, items.get(rel, rel) if ref.get("items") else rel
            raise AssertionError(f"{d['metadata']['name']}: nothing mounted at {path}")

        if d["kind"] == "Job":
            env = {e["name"]: e.get("value") for e in container.get("env") or []}
            security = {"cluster_secret_file": env.get("CAUSEWAY_CLUSTER_SECRET_FILE"),
                        "admin_token_file": env.get("CAUSEWAY_ADMIN_TOKEN_FILE")}
            if "CAUSEWAY_TLS_CA" in env:
                security["tls"] = {"ca": env["CAUSEWAY_TLS_CA"], "cert": env["CAUSEWAY_TLS_CERT"],
                                   "key": env["CAUSEWAY_TLS_KEY"]}
        else:
            config = next(a.split("=", 1)[1] for a in container["args"] if a.startswith("--config="))
            kind, name, key = source(config)
            obj = next(o for o in docs if o["kind"] == kind and o["metadata"]["name"] == name)
            text = (obj.get("data") or {}).get(key) or (obj.get("stringData") or {}).get(key)
            security = json.loads(text)["security"]
        flat = {}
        for field, value in security.items():
            if isinstance(value, dict):
                flat.update({f"{field}.{k}": v for k, v in value.items()})
            elif value is not None:
                flat[field] = value
        found[d["metadata"]["name"]] = {}
        for field, path in flat.items():
            kind, name, key = source(path)
            assert kind == "Secret", f"{d['metadata']['name']}: {field} from a {kind}"
            found[d["metadata"]["name"]][field] = (name, key)
    return found


class Chart(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.TemporaryDirectory()
        cls.rendered = {}
        for values in CI_VALUES:
            path = pathlib.Path(cls.dir.name) / values.name.replace("-values", "")
            path.write_text(
                run(HELM, "template", "rel", str(CHART), "--namespace", NAMESPACE, "-f", str(values)).stdout
            )
            cls.rendered[values.stem] = path

    @classmethod
    def tearDownClass(cls):
        cls.dir.cleanup()

    def test_lint_strict_with_every_ci_values_file(self):
        self.assertGreaterEqual(len(CI_VALUES), 4)
        for values in CI_VALUES:
            with self.subTest(values=values.name):
                out = run(HELM, "lint", "--strict", str(CHART), "-f", str(values)).stdout
                self.assertIn("0 chart(s) failed", out)

    def test_manifests_are_valid_for_every_kubernetes_version(self):
        versions = run(str(REPO / "scripts/k8s-tools.sh"), "--versions").stdout.split()
        self.assertIn("1.29", versions)
        files = [str(p) for p in self.rendered.values()]
        for version in versions:
            with self.subTest(kubernetes=version):
                result = run(
                    str(TOOLS / "bin/kubernetes-validate"), "--strict", "--quiet",
                    "-k", f"{version}.0", *files, check=False,
                )
                errors = [l for l in result.stdout.splitlines() + result.stderr.splitlines()
                          if l and not re.search(r"Couldn't find schema for kind (ServiceMonitor|PrometheusRule)", l)]
                self.assertEqual(result.returncode, 0, "\n".join(errors))
                self.assertEqual(errors, [])

    def test_the_validator_refuses_an_unknown_field(self):
        """So that the check above can fail: strict validation finds a misspelt field."""
        docs = yaml.safe_load_all(self.rendered["default-values"].read_text())
        sts = next(d for d in docs if d and d["kind"] == "StatefulSet")
        sts["spec"]["podManagementPolicey"] = "Parallel"
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            yaml.safe_dump(sts, f)
            f.flush()
            result = run(str(TOOLS / "bin/kubernetes-validate"), "--strict", "--quiet", "-k", "1.29.0", f.name, check=False)
        self.assertNotEqual(result.returncode, 0, result.stdout)

    def test_security_scans_find_nothing_high_and_every_lower_finding_is_accepted(self):
        accepted = accepted_findings()
        self.assertTrue(accepted, "the README lists the accepted findings")
        scan_dir = pathlib.Path(self.dir.name)
        (scan_dir / "Dockerfile").write_text((REPO / "Dockerfile").read_text())
        trivy = run(str(TOOLS / "bin/trivy"), "config", "--quiet", "--skip-check-update",
                    "--format", "json", "--exit-code", "0", str(scan_dir))
        findings = set()
        for result in json.loads(trivy.stdout).get("Results") or []:
            for m in result.get("Misconfigurations") or []:
                self.assertNotIn(m["Severity"], ("HIGH", "CRITICAL"), f"{result['Target']}: {m['AVDID']} {m['Title']}")
                findings.add(m["AVDID"])
        # checkov on the rendered manifests and the Dockerfile, and on the chart itself (its helm
        # framework renders it with each ci/ values file, with the helm binary on the PATH).
        checkov = [str(TOOLS / "bin/checkov"), "--skip-download", "--quiet", "--compact", "-o", "json"]
        runs = [["-d", str(scan_dir), "--framework", "kubernetes", "dockerfile"]]
        runs += [["-d", str(CHART), "--framework", "helm", "--var-file", str(v)] for v in CI_VALUES]
        env = dict(os.environ, PATH=f"{TOOLS / 'bin'}:{os.environ['PATH']}")
        for args in runs:
            result = subprocess.run(checkov + args, capture_output=True, text=True, timeout=300, env=env)
            reports = json.loads(result.stdout)
            reports = reports if isinstance(reports, list) else [reports]
            self.assertTrue(any(r.get("summary", {}).get("passed") for r in reports), f"checkov {args} checked nothing")
            for report in reports:
                self.assertEqual(report["summary"].get("parsing_errors", 0), 0, args)
                for failed in report.get("results", {}).get("failed_checks", []):
                    self.assertNotIn(failed.get("severity"), ("HIGH", "CRITICAL"), failed["check_id"])
                    findings.add(failed["check_id"])
        self.assertEqual(sorted(findings - accepted.keys()), [], "findings not accepted in README.md")

    def test_an_upgrade_changes_no_immutable_statefulset_field(self):
        base = ["-f", str(CHART / "ci/default-values.yaml")]
        before = by_kind(render(*base), "StatefulSet")
        upgrades = {
            "image and partitions": base + ["--set", "image.tag=0.2.0", "--set", "cluster.partitions=3"],
            "scale-down": ["-f", str(CHART / "ci/scale-down-values.yaml")],
            "resources and tuning": base + ["--set", "store.resources.limits.memory=8Gi",
                                            "--set", "store.tuning.gossip_interval_ms=20",
                                            "--set", "cdc.enabled=true"],
        }
        for what, args in upgrades.items():
            after = by_kind(render(*args), "StatefulSet")
            for name, old in before.items():
                with self.subTest(upgrade=what, statefulset=name):
                    new = after[name]
                    for field in ("selector", "serviceName", "volumeClaimTemplates", "podManagementPolicy"):
                        self.assertEqual(old["spec"].get(field), new["spec"].get(field), field)
        grown = by_kind(render(*upgrades["image and partitions"]), "StatefulSet")
        self.assertEqual(grown["rel-causeway-store"]["spec"]["replicas"], 9)

    def test_the_schema_refuses_bad_values(self):
        good = ["--set", "kafka.bootstrapServers=k:9092"]
        bad = {
            "no Kafka": ([], "bootstrapServers"),
            "zero partitions": (good + ["--set", "cluster.partitions=0"], "/cluster/partitions"),
            "ten replicas": (good + ["--set", "cluster.replicas=10"], "/cluster/replicas"),
            "a misspelt value": (good + ["--set", "store.replicaz=3"], "replicaz"),
            "a bad anti-affinity": (good + ["--set", "store.podAntiAffinity=always"], "podAntiAffinity"),
            "a bad port": (good + ["--set", "api.port=70000"], "/api/port"),
            "a bad duration": (good + ["--set", "cluster.transitionTimeout=soon"], "transitionTimeout"),
            "no memory limit": (good + ["--set", "store.resources.limits.memory=null"], "memory"),
            "internal TLS without its Secret": (good + ["--set", "internalTLS.enabled=true"], "/internalTLS/existingSecret"),
            "a bad Secret key": (good + ["--set", "internalAuth.adminTokenKey=a/b"], "/internalAuth/adminTokenKey"),
            "one key for both credentials": (good + ["--set", "internalAuth.adminTokenKey=cluster-secret"], "must differ"),
            "a bad feed name": (good + ["--set-json", 'cdc.feeds=[{"name":"a b","collections":["x"],"sink":{"type":"kafka"}}]'], "name"),
        }
        for what, (args, expected) in bad.items():
            with self.subTest(what):
                result = run(HELM, "template", "rel", str(CHART), *args, check=False)
                self.assertNotEqual(result.returncode, 0, f"{what} was accepted")
                self.assertIn(expected, result.stderr)
        run(HELM, "template", "rel", str(CHART), *good)

    def test_the_readme_lists_every_value(self):
        readme = (CHART / "README.md").read_text()
        self.assertEqual(readme, values_doc.readme_with_table(readme),
                         "README.md is out of date: python3 charts/causeway/tests/values_doc.py --write")
        schema = json.loads((CHART / "values.schema.json").read_text())
        documented = {path for path, *_ in values_doc.rows(schema, values_doc.load_values())}
        defaults = yaml.safe_load((CHART / "values.yaml").read_text())

        def leaves(values, prefix=""):
            for k, v in values.items():
                if isinstance(v, dict) and f"{prefix}{k}" not in documented:
                    yield from leaves(v, f"{prefix}{k}.")
                else:
                    yield f"{prefix}{k}"

        self.assertEqual(sorted(set(leaves(defaults)) - documented), [], "values without a schema entry")

    def test_hooks_bootstrap_then_scale_in_the_right_order(self):
        docs = render("-f", str(CHART / "ci/scale-down-values.yaml"))
        jobs = by_kind(docs, "Job")
        hooks = {j["metadata"]["annotations"]["helm.sh/hook"]: j["spec"]["template"]["spec"]["containers"][0]["args"]
                 for j in jobs.values()}
        shape = ["--partitions=1", "--replicas=2"]
        self.assertEqual(hooks["post-install"][:2], ["admin", "bootstrap"])
        self.assertEqual(hooks["pre-upgrade"][:2] + hooks["pre-upgrade"][2:4], ["admin", "scale"] + shape)
        self.assertIn("--only=fewer-nodes", hooks["pre-upgrade"])
        self.assertIn("--only=not-fewer-nodes", hooks["post-upgrade"])
        for args in hooks.values():
            self.assertTrue(set(shape) <= set(args), args)
        store = by_kind(docs, "StatefulSet")["rel-causeway-store"]
        self.assertEqual(store["spec"]["replicas"], 2)
        test = by_kind(docs, "Pod")["rel-causeway-check"]
        self.assertEqual(test["metadata"]["annotations"]["helm.sh/hook"], "test")
        self.assertEqual(test["spec"]["containers"][0]["args"][0], "check")
        self.assertEqual(store["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"], "Delete")

    def test_every_container_runs_a_shipped_binary_with_flags_it_has(self):
        """The image's binaries, built on this machine: each flag the chart passes is in --help."""
        target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", pathlib.Path.home() / ".cache/causeway-target")) / "debug"
        docs = render("-f", str(CHART / "ci/3x3-tls-values.yaml"))
        pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("StatefulSet", "Deployment", "Job")]
        pods += [d["spec"] for d in docs if d["kind"] == "Pod"]
        seen = set()
        for pod in pods:
            container = pod["containers"][0]
            binary, args = container["command"][0], container["args"]
            words = [a for a in args if not a.startswith("-")]
            help_text = run(str(target / binary), *words, "--help").stdout
            for flag in (a.split("=", 1)[0] for a in args if a.startswith("--")):
                with self.subTest(binary=binary, flag=flag):
                    self.assertRegex(help_text, rf"(^|\s){re.escape(flag)}[\s=<]")
            seen.add(binary)
        self.assertEqual(seen, {"causeway-store-node", "causeway-config-manager", "causeway-api-server",
                                "causeway-cdc", "causeway"})

    def test_workloads_are_locked_down(self):
        docs = render("-f", str(CHART / "ci/default-values.yaml"))
        for d in docs:
            spec = (d.get("spec") or {}).get("template", {}).get("spec") or (d["spec"] if d["kind"] == "Pod" else None)
            if spec is None:
                continue
            with self.subTest(d["kind"] + "/" + d["metadata"]["name"]):
                self.assertFalse(spec["automountServiceAccountToken"])
                self.assertTrue(spec["securityContext"]["runAsNonRoot"])
                self.assertEqual(spec["securityContext"]["seccompProfile"]["type"], "RuntimeDefault")
                for c in spec["containers"]:
                    sc = c["securityContext"]
                    self.assertTrue(sc["readOnlyRootFilesystem"])
                    self.assertFalse(sc["allowPrivilegeEscalation"])
                    self.assertEqual(sc["capabilities"]["drop"], ["ALL"])
                    self.assertEqual(sc["runAsUser"], 10001)

    def test_internal_links_have_the_cluster_secret_and_only_the_admin_side_the_admin_token(self):
        docs = render("-f", str(CHART / "ci/default-values.yaml"), "--set", "cdc.enabled=true")
        secret = by_kind(docs, "Secret")["rel-causeway-cluster"]
        generated = secret["stringData"]
        self.assertEqual(sorted(generated), ["admin-token", "cluster-secret"])
        for value in generated.values():
            self.assertGreaterEqual(len(value), 32)
            self.assertRegex(value, r"^[A-Za-z0-9]+$")
        self.assertNotEqual(generated["admin-token"], generated["cluster-secret"])
        files = security_files(docs)
        self.assertEqual(sorted(files), ["rel-causeway-api", "rel-causeway-bootstrap", "rel-causeway-cdc",
                                         "rel-causeway-config-manager", "rel-causeway-scale-down",
                                         "rel-causeway-scale-up", "rel-causeway-store"])
        admin_side = {"rel-causeway-config-manager", "rel-causeway-bootstrap", "rel-causeway-scale-down",
                      "rel-causeway-scale-up"}
        for workload, found in files.items():
            with self.subTest(workload):
                expected = {"cluster_secret_file": ("rel-causeway-cluster", "cluster-secret")}
                if workload in admin_side:
                    expected["admin_token_file"] = ("rel-causeway-cluster", "admin-token")
                self.assertEqual(found, expected)
        # The test pod uses the document API only.
        check = by_kind(docs, "Pod")["rel-causeway-check"]["spec"]
        self.assertEqual([v["name"] for v in check["volumes"]], ["auth"])

    def test_internal_tls_gives_each_process_its_role_certificate(self):
        docs = render("-f", str(CHART / "ci/internal-tls-values.yaml"))
        self.assertNotIn("rel-causeway-cluster", by_kind(docs, "Secret"), "internalAuth.existingSecret is set")
        roles = {"rel-causeway-api": "api-server", "rel-causeway-cdc": "cdc",
                 "rel-causeway-config-manager": "config-manager", "rel-causeway-store": "store-node-$(POD_INDEX)",
                 "rel-causeway-bootstrap": "admin", "rel-causeway-scale-down": "admin",
                 "rel-causeway-scale-up": "admin"}
        files = security_files(docs)
        self.assertEqual(sorted(files), sorted(roles))
        for workload, role in roles.items():
            with self.subTest(workload):
                found = files[workload]
                self.assertEqual(found["cluster_secret_file"], ("causeway-cluster-credentials", "cluster-secret"))
                self.assertEqual(found["tls.ca"], ("causeway-internal-tls", "ca.crt"))
                self.assertEqual(found["tls.cert"], ("causeway-internal-tls", f"{role}.crt"))
                self.assertEqual(found["tls.key"], ("causeway-internal-tls", f"{role}.key"))
        # A store pod's id is its ordinal: POD_INDEX is the pod's index label, as --node-id is
        # its name's ordinal.
        store = by_kind(docs, "StatefulSet")["rel-causeway-store"]["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e for e in store["env"]}
        self.assertEqual(env["POD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"],
                         "metadata.labels['apps.kubernetes.io/pod-index']")
        self.assertIn("--node-id=$(POD_NAME)", store["args"])
        # The hook Jobs' admin commands: the admin certificate, and the token.
        for name in ("rel-causeway-bootstrap", "rel-causeway-scale-down", "rel-causeway-scale-up"):
            job = by_kind(docs, "Job")[name]["spec"]["template"]["spec"]["containers"][0]
            env = {e["name"]: e.get("value") for e in job["env"]}
            self.assertEqual(env["CAUSEWAY_TLS_CERT"], "/etc/causeway/internal-tls/tls.crt", name)
            self.assertEqual(env["CAUSEWAY_ADMIN_TOKEN_FILE"], "/etc/causeway/cluster/admin-token", name)

    def test_hook_jobs_set_only_environment_variables_their_command_reads(self):
        """The admin commands take their credentials from CAUSEWAY_* variables: each one a Job
        sets is one its command's --help names."""
        target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", pathlib.Path.home() / ".cache/causeway-target")) / "debug"
        docs = render("-f", str(CHART / "ci/internal-tls-values.yaml"))
        for name, job in by_kind(docs, "Job").items():
            container = job["spec"]["template"]["spec"]["containers"][0]
            words = [a for a in container["args"] if not a.startswith("-")]
            help_text = run(str(target / container["command"][0]), *words, "--help").stdout
            for var in (e["name"] for e in container["env"] if e["name"].startswith("CAUSEWAY_")):
                with self.subTest(job=name, env=var):
                    self.assertIn(f"env: {var}", help_text)

    def test_store_caches_are_sized_under_the_memory_limit(self):
        docs = render("-f", str(CHART / "ci/default-values.yaml"), "--set", "store.resources.limits.memory=8Gi")
        options = json.loads(by_kind(docs, "ConfigMap")["rel-causeway-store"]["data"]["store-node.json"])
        self.assertEqual(options["store"]["block_cache_bytes"], 2 << 30)
        self.assertEqual(options["store"]["cache_bytes"], 2 << 30)

    def test_alerts_name_metrics_that_exist(self):
        docs = render("-f", str(CHART / "ci/3x3-tls-values.yaml"))
        rule = next(d for d in docs if d["kind"] == "PrometheusRule")
        exprs = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
        names = {n for e in exprs for n in re.findall(r"\bcauseway_[a-z_]+", e)}
        sources = "".join(p.read_text() for crate in ("store-node", "cdc") for p in (REPO / crate / "src").rglob("*.rs"))
        for name in sorted(names):
            with self.subTest(metric=name):
                bare = re.sub(r"^causeway_(store|cdc)_", "", name)
                self.assertTrue(name in sources or f'"{bare}"' in sources, f"{name} is not a metric")


if __name__ == "__main__":
    unittest.main()
