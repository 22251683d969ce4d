//! deploy/: every file an operator adopts, checked with the tools operators use.
//!
//! - `kubectl kustomize` renders the base and every overlay; `kubernetes-validate --strict`
//!   validates the output against Kubernetes 1.32's schemas (it has no schema for the
//!   Prometheus Operator's ServiceMonitor and PrometheusRule: their fields are checked here);
//! - the Pods meet the "restricted" Pod Security Standard (the fields checked one by one), and
//!   PyPI's `checkov` (its Kubernetes checks) passes on every rendered kustomization, with only
//!   the checks the manifests skip by annotation, each with its reason;
//! - `promtool check rules` on the alerts, and the PrometheusRule carries the same groups;
//! - the APISIX examples parse and their etcd section points at the proxy Service;
//! - the Dockerfile: runtime base pinned by digest, non-root user, stripped binary;
//! - a live proxy under a little load: `promtool check metrics` is clean, and every metric the
//!   dashboard and the alerts query exists with the labels they use.
//!
//! A tool that is missing skips its check with a loud message, except under CI (`CI` set),
//! where `.ci/install --test` has installed them and a missing tool fails the test.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use etcd_fanout::proto::etcdserverpb::{
    watch_request::RequestUnion, PutRequest, RangeRequest, WatchCreateRequest, WatchRequest,
};
use serde_json::Value;
use testkit::{Clients, Etcd, Proxy};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy(p: &str) -> PathBuf {
    root().join("deploy").join(p)
}

/// True when `cmd args` can run. Otherwise prints a loud skip (or panics under CI).
fn have(tool: &str, args: &[&str]) -> bool {
    let ok = Command::new(tool)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        let msg =
            format!("`{tool}` is not available: run `bash .ci/install --test` (it installs it)");
        if std::env::var_os("CI").is_some() {
            panic!("{msg}");
        }
        eprintln!("\n!!!!!!!! SKIPPED: {msg} !!!!!!!!\n");
    }
    ok
}

/// Runs a command, returns stdout; panics with its output when it fails.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// YAML documents as JSON values (PyYAML, which kubernetes-validate installs).
fn yaml_docs(text: &str) -> Vec<Value> {
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import json,sys,yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write yaml");
    let out = child.wait_with_output().expect("python3");
    assert!(
        out.status.success(),
        "YAML does not parse: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).expect("json") {
        Value::Array(v) => v,
        v => panic!("not a list: {v}"),
    }
}

fn yaml_file(p: &Path) -> Value {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut docs = yaml_docs(&text);
    assert_eq!(docs.len(), 1, "{}: one document", p.display());
    docs.remove(0)
}

fn have_yaml() -> bool {
    have("python3", &["-c", "import yaml"])
}

/// The kustomizations: the base and every overlay.
fn kustomizations() -> Vec<PathBuf> {
    let mut dirs = vec![deploy("kubernetes")];
    let mut overlays: Vec<PathBuf> = std::fs::read_dir(deploy("overlays"))
        .expect("deploy/overlays")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("kustomization.yaml").exists())
        .collect();
    overlays.sort();
    assert!(overlays.len() >= 2, "overlays: {overlays:?}");
    dirs.extend(overlays);
    dirs
}

fn render(dir: &Path) -> String {
    run(Command::new("kubectl").arg("kustomize").arg(dir))
}

fn kind<'a>(docs: &'a [Value], k: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == k)
        .unwrap_or_else(|| panic!("no {k} rendered"))
}

/// The "restricted" Pod Security Standard (and this project's own rules) on a pod template.
fn check_restricted(name: &str, pod: &Value) {
    let spec = &pod["spec"];
    let psc = &spec["securityContext"];
    for host in ["hostNetwork", "hostPID", "hostIPC"] {
        assert_ne!(spec[host], true, "{name}: {host}");
    }
    assert_eq!(spec["automountServiceAccountToken"], false, "{name}");
    for v in spec["volumes"].as_array().into_iter().flatten() {
        let allowed = [
            "secret",
            "configMap",
            "emptyDir",
            "projected",
            "persistentVolumeClaim",
        ];
        assert!(
            allowed.iter().any(|k| v.get(*k).is_some()),
            "{name}: volume type not allowed by restricted: {v}"
        );
    }
    assert!(
        !spec["topologySpreadConstraints"]
            .as_array()
            .is_none_or(|a| a.is_empty()),
        "{name}: topology spread"
    );
    let containers = spec["containers"].as_array().expect("containers");
    for c in containers
        .iter()
        .chain(spec["initContainers"].as_array().into_iter().flatten())
    {
        let sc = &c["securityContext"];
        let cname = format!("{name}/{}", c["name"]);
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{cname}");
        assert_ne!(sc["privileged"], true, "{cname}");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{cname}");
        assert!(
            sc["runAsNonRoot"] == true || psc["runAsNonRoot"] == true,
            "{cname}: runAsNonRoot"
        );
        for ctx in [sc, psc] {
            if let Some(uid) = ctx["runAsUser"].as_i64() {
                assert_ne!(uid, 0, "{cname}: runAsUser 0");
            }
        }
        let seccomp = if sc["seccompProfile"].is_null() {
            &psc["seccompProfile"]
        } else {
            &sc["seccompProfile"]
        };
        assert!(
            seccomp["type"] == "RuntimeDefault" || seccomp["type"] == "Localhost",
            "{cname}: seccompProfile {seccomp}"
        );
        let drop: Vec<&str> = sc["capabilities"]["drop"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str())
            .collect();
        assert!(drop.contains(&"ALL"), "{cname}: capabilities.drop ALL");
        let add: Vec<&str> = sc["capabilities"]["add"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str())
            .collect();
        assert!(
            add.iter().all(|a| *a == "NET_BIND_SERVICE"),
            "{cname}: capabilities.add {add:?}"
        );
        let image = c["image"].as_str().expect("image");
        let tag = image.rsplit('/').next().unwrap_or(image);
        assert!(
            image.contains("@sha256:") || (tag.contains(':') && !tag.ends_with(":latest")),
            "{cname}: image {image} is not pinned"
        );
        assert!(
            c["resources"]["limits"]["memory"].is_string(),
            "{cname}: memory limit"
        );
    }
}

#[test]
fn kustomize_renders_validates_and_is_restricted() {
    if !have("kubectl", &["version", "--client"]) || !have_yaml() {
        return;
    }
    let validate = have("kubernetes-validate", &["--version"]);
    let alerts = yaml_file(&deploy("prometheus/alerts.yaml"));
    for dir in kustomizations() {
        let name = dir
            .strip_prefix(root())
            .unwrap_or(&dir)
            .display()
            .to_string();
        let text = render(&dir);
        let docs = yaml_docs(&text);
        let kinds: BTreeSet<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
        for k in [
            "Deployment",
            "Service",
            "PodDisruptionBudget",
            "HorizontalPodAutoscaler",
            "ServiceAccount",
            "NetworkPolicy",
            "ServiceMonitor",
            "PrometheusRule",
        ] {
            assert!(kinds.contains(k), "{name}: no {k} in {kinds:?}");
        }
        if validate {
            let file = tempfile::NamedTempFile::new().expect("tmp");
            std::fs::write(file.path(), &text).expect("write");
            let out = run(Command::new("kubernetes-validate")
                .args(["--strict", "-k", "1.32.0"])
                .arg(file.path()));
            // Everything but the two CRDs must have been validated against a schema.
            for d in &docs {
                let k = d["kind"].as_str().unwrap_or("");
                if k == "ServiceMonitor" || k == "PrometheusRule" {
                    continue;
                }
                let needle = format!("passed for resource {}/", k.to_lowercase());
                assert!(out.contains(&needle), "{name}: {k} not validated:\n{out}");
            }
        }

        // Restricted PSS and spreading.
        let dep = kind(&docs, "Deployment");
        check_restricted(&name, &dep["spec"]["template"]);
        let sa = kind(&docs, "ServiceAccount");
        assert_eq!(sa["automountServiceAccountToken"], false, "{name}");
        assert_eq!(
            dep["spec"]["template"]["spec"]["serviceAccountName"], sa["metadata"]["name"],
            "{name}"
        );

        // The Service, PDB, HPA, NetworkPolicy and ServiceMonitor select the Deployment.
        let pod_labels = &dep["spec"]["template"]["metadata"]["labels"];
        let selects = |sel: &Value| {
            sel.as_object()
                .is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| &pod_labels[k] == v))
        };
        let svc = kind(&docs, "Service");
        assert!(
            selects(&svc["spec"]["selector"]),
            "{name}: Service selector"
        );
        assert!(
            selects(&kind(&docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]),
            "{name}: PDB selector"
        );
        assert!(
            selects(&kind(&docs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"]),
            "{name}: NetworkPolicy selector"
        );
        let hpa = kind(&docs, "HorizontalPodAutoscaler");
        assert_eq!(
            hpa["spec"]["scaleTargetRef"]["name"],
            dep["metadata"]["name"]
        );
        let svc_labels = &svc["metadata"]["labels"];
        let sm = kind(&docs, "ServiceMonitor");
        assert!(
            sm["spec"]["selector"]["matchLabels"]
                .as_object()
                .is_some_and(|m| m.iter().all(|(k, v)| &svc_labels[k] == v)),
            "{name}: ServiceMonitor selects the Service"
        );
        let port_names: Vec<&Value> = svc["spec"]["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .map(|p| &p["name"])
            .collect();
        for ep in sm["spec"]["endpoints"].as_array().expect("endpoints") {
            assert!(port_names.contains(&&ep["port"]), "{name}: {ep}");
            assert_eq!(ep["path"], "/metrics", "{name}");
        }
        let container_ports: Vec<&Value> = dep["spec"]["template"]["spec"]["containers"][0]
            ["ports"]
            .as_array()
            .expect("container ports")
            .iter()
            .map(|p| &p["name"])
            .collect();
        for p in svc["spec"]["ports"].as_array().expect("ports") {
            assert!(container_ports.contains(&&p["targetPort"]), "{name}: {p}");
        }
        // The PrometheusRule carries exactly the alerts promtool checks.
        assert_eq!(
            kind(&docs, "PrometheusRule")["spec"]["groups"],
            alerts["groups"],
            "{name}: PrometheusRule differs from deploy/prometheus/alerts.yaml"
        );
    }
}

/// Seconds of a Go duration as the manifests write them (`5s`, `10m`, `1m30s`).
fn go_seconds(d: &str) -> u64 {
    let (mut total, mut num) = (0u64, String::new());
    for c in d.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().unwrap_or_else(|_| panic!("duration {d:?}"));
        total += n * match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            _ => panic!("duration {d:?}: unit {c:?}"),
        };
        num.clear();
    }
    assert!(num.is_empty(), "duration {d:?} without a unit");
    total
}

/// The replica tier's settings in every rendered kustomization (issue 13): a SIGTERM rollout
/// (`--shutdown-delay` + `--shutdown-timeout` + the 5 s task stop inside
/// `terminationGracePeriodSeconds`), `--max-connection-age` with its grace, `/livez` for
/// liveness and `/readyz` for readiness (TCP probes only where client certificates are
/// required: kubelet has none), and discovery in the `discovery` overlay: the pod IP from the
/// downward API as `--advertise-client-url`, a resolver prefix and TTL.
#[test]
fn every_kustomization_sets_the_tier_flags() {
    if !have("kubectl", &["version", "--client"]) || !have_yaml() {
        return;
    }
    let mut discovery = 0;
    for dir in kustomizations() {
        let name = dir.display().to_string();
        let docs = yaml_docs(&render(&dir));
        let dep = kind(&docs, "Deployment");
        let pod = &dep["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        let env: BTreeMap<&str, &Value> = c["env"]
            .as_array()
            .expect("env")
            .iter()
            .filter_map(|e| Some((e["name"].as_str()?, e)))
            .collect();
        let value = |k: &str| env.get(k).and_then(|e| e["value"].as_str());
        let args: Vec<&str> = c["args"]
            .as_array()
            .expect("args")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let secs = |k: &str| go_seconds(value(k).unwrap_or_else(|| panic!("{name}: no {k}")));
        let (delay, timeout) = (
            secs("ETCD_FANOUT_SHUTDOWN_DELAY"),
            secs("ETCD_FANOUT_SHUTDOWN_TIMEOUT"),
        );
        assert!(delay >= 2, "{name}: shutdown delay {delay} s");
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
        assert!(
            grace >= delay + timeout + 5,
            "{name}: terminationGracePeriodSeconds {grace} < delay {delay} + timeout {timeout} + 5"
        );
        assert!(secs("ETCD_FANOUT_MAX_CONNECTION_AGE") > 0, "{name}");
        let age_grace = secs("ETCD_FANOUT_MAX_CONNECTION_AGE_GRACE");
        assert!(
            age_grace > 0 && age_grace <= grace,
            "{name}: age grace {age_grace}"
        );
        let mtls = args.contains(&"--client-cert-auth");
        for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/livez")] {
            let p = &c[probe];
            if mtls {
                assert!(p["tcpSocket"].is_object(), "{name}: {probe} {p}");
            } else {
                assert_eq!(p["httpGet"]["path"], path, "{name}: {probe}");
            }
        }
        if let Some(url) = value("ETCD_FANOUT_ADVERTISE_CLIENT_URL") {
            discovery += 1;
            let (var, _) = url
                .strip_prefix("http://$(")
                .and_then(|r| r.split_once(')'))
                .unwrap_or_else(|| panic!("{name}: advertise URL {url}"));
            assert_eq!(
                env[var]["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP",
                "{name}: {var}"
            );
            assert!(url.ends_with(":23790"), "{name}: {url}");
            assert!(value("ETCD_FANOUT_RESOLVER_PREFIX").is_some(), "{name}");
            let ttl: u64 = value("ETCD_FANOUT_RESOLVER_TTL")
                .and_then(|t| t.parse().ok())
                .unwrap_or_else(|| panic!("{name}: resolver TTL"));
            assert!((5..=300).contains(&ttl), "{name}: TTL {ttl}");
        }
    }
    assert!(discovery >= 1, "no kustomization sets discovery");
}

/// Checks that do not apply to these manifests: each is skipped by a `checkov.io/skipN`
/// annotation whose comment (in the manifest) says why.
const CHECKOV_SKIPS: [&str; 4] = [
    "CKV_K8S_11", // no CPU limit on purpose (throttling stalls the fan-out)
    "CKV_K8S_15", // imagePullPolicy IfNotPresent for a pinned image
    "CKV_K8S_21", // namespace chosen by the operator
    "CKV_K8S_43", // digest of the operator's own image build
];

/// The checkov executable: on `PATH`, or in the virtualenv `.ci/install --test` makes
/// (`$ETCD_FANOUT_CHECKOV_VENV`, default `~/.local/share/etcd-fanout/checkov`), which is
/// made here when missing. `None` (a loud skip, also under CI) only when pip cannot install
/// it (e.g. no package index reachable).
fn checkov() -> Option<PathBuf> {
    let works = |p: &Path| {
        Command::new(p)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if works(Path::new("checkov")) {
        return Some(PathBuf::from("checkov"));
    }
    let venv = std::env::var_os("ETCD_FANOUT_CHECKOV_VENV")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".local/share/etcd-fanout/checkov"))
        })?;
    let bin = venv.join("bin/checkov");
    if works(&bin) {
        return Some(bin);
    }
    eprintln!("checkov not found: installing it into {}", venv.display());
    let installed = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("timeout")
            .arg("900")
            .arg(venv.join("bin/pip"))
            .args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "checkov",
            ])
            .status()
            .is_ok_and(|s| s.success());
    if installed && works(&bin) {
        return Some(bin);
    }
    eprintln!("\n!!!!!!!! SKIPPED: pip could not install checkov (see above) !!!!!!!!\n");
    None
}

#[test]
fn checkov_passes_on_every_rendered_kustomization() {
    if !have("kubectl", &["version", "--client"]) {
        return;
    }
    let Some(checkov) = checkov() else { return };
    // Not tempfile's default `.tmp...`: checkov skips hidden directories.
    let dir = tempfile::Builder::new()
        .prefix("checkov-")
        .tempdir()
        .expect("tmp");
    for k in kustomizations() {
        let name = k
            .strip_prefix(root())
            .unwrap_or(&k)
            .display()
            .to_string()
            .replace('/', "-");
        std::fs::write(dir.path().join(format!("{name}.yaml")), render(&k)).expect("write");
    }
    let out = Command::new(&checkov)
        .arg("-d")
        .arg(dir.path())
        .args(["--framework", "kubernetes", "--skip-download", "-o", "json"])
        // checkov looks for its configuration in the working directory.
        .current_dir(dir.path())
        .output()
        .expect("checkov");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "checkov output is not JSON ({e}, {}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    // One report, or one per check type when checkov found more than one.
    let report = match report {
        Value::Array(all) => all
            .into_iter()
            .find(|r| r["check_type"] == "kubernetes")
            .expect("a kubernetes report"),
        r => r,
    };
    let summary = &report["summary"];
    let failed: Vec<String> = report["results"]["failed_checks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| format!("{} {} ({})", c["check_id"], c["check_name"], c["resource"]))
        .collect();
    assert!(failed.is_empty(), "checkov failed:\n{}", failed.join("\n"));
    assert_eq!(summary["parsing_errors"], 0, "{summary}");
    assert!(
        summary["resource_count"].as_u64().is_some_and(|n| n >= 20),
        "{summary}"
    );
    assert!(
        summary["passed"].as_u64().is_some_and(|n| n > 100),
        "{summary}"
    );
    for c in report["results"]["skipped_checks"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let id = c["check_id"].as_str().unwrap_or("");
        assert!(
            CHECKOV_SKIPS.contains(&id),
            "{id} ({}) skipped without being known here",
            c["resource"]
        );
        assert!(
            c["check_result"]["suppress_comment"]
                .as_str()
                .is_some_and(|s| s.len() > 10),
            "{id} skipped without a reason: {c}"
        );
    }
    assert!(out.status.success(), "checkov exit {}", out.status);
}

#[test]
fn alerts_pass_promtool_and_have_runbooks() {
    if !have("promtool", &["--version"]) || !have_yaml() {
        return;
    }
    let out = run(Command::new("promtool")
        .args(["check", "rules"])
        .arg(deploy("prometheus/alerts.yaml")));
    assert!(out.contains("SUCCESS"), "{out}");
    let runbook = std::fs::read_to_string(deploy("RUNBOOK.md")).expect("RUNBOOK.md");
    let anchors: BTreeSet<String> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(|h| h.trim().to_lowercase())
        .collect();
    let alerts = yaml_file(&deploy("prometheus/alerts.yaml"));
    let mut n = 0;
    for g in alerts["groups"].as_array().expect("groups") {
        for r in g["rules"].as_array().expect("rules") {
            let alert = r["alert"].as_str().expect("alert");
            let link = r["annotations"]["runbook"].as_str().expect("runbook");
            let anchor = link.split_once('#').map(|(_, a)| a).expect("anchor");
            assert!(
                anchors.contains(anchor),
                "{alert}: runbook section #{anchor} missing in deploy/RUNBOOK.md"
            );
            assert!(r["labels"]["severity"].is_string(), "{alert}: severity");
            n += 1;
        }
    }
    assert!(n >= 5, "{n} alerts");
}

#[test]
fn apisix_examples_point_at_the_proxy_service() {
    if !have("kubectl", &["version", "--client"]) || !have_yaml() {
        return;
    }
    let docs = yaml_docs(&render(&deploy("kubernetes")));
    let svc = kind(&docs, "Service");
    let svc_name = svc["metadata"]["name"].as_str().expect("name");
    let port = svc["spec"]["ports"][0]["port"].as_i64().expect("port");
    let dep = kind(&docs, "Deployment");
    let env = &dep["spec"]["template"]["spec"]["containers"][0]["env"];
    let prefixes = env
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "ETCD_FANOUT_PREFIXES")
        .and_then(|e| e["value"].as_str())
        .expect("ETCD_FANOUT_PREFIXES");

    let mut seen = BTreeSet::new();
    for entry in std::fs::read_dir(deploy("apisix")).expect("deploy/apisix") {
        let path = entry.expect("entry").path();
        let file = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        if !file.ends_with(".yaml") {
            continue;
        }
        let conf = yaml_file(&path);
        let (major, etcd) = if file.starts_with("config-3.") {
            let role = conf["deployment"]["role"]
                .as_str()
                .expect("deployment.role");
            assert!(
                ["traditional", "data_plane"].contains(&role),
                "{file}: role {role}"
            );
            let provider = &conf["deployment"][format!("role_{role}")]["config_provider"];
            assert_eq!(provider, "etcd", "{file}");
            (3, &conf["deployment"]["etcd"])
        } else if file.starts_with("config-2.") {
            assert!(
                conf.get("deployment").is_none(),
                "{file}: 2.x has no deployment:"
            );
            (2, &conf["etcd"])
        } else {
            panic!("{file}: unknown APISIX version");
        };
        let tls = file.contains("-tls");
        let creds = file.contains("-credentials");
        let hosts = etcd["host"].as_array().expect("etcd.host");
        assert!(!hosts.is_empty(), "{file}");
        for h in hosts {
            let h = h.as_str().expect("host");
            let scheme = if tls { "https://" } else { "http://" };
            let rest = h
                .strip_prefix(scheme)
                .unwrap_or_else(|| panic!("{file}: {h} is not {scheme}"));
            let (host, p) = rest.rsplit_once(':').expect("host:port");
            assert!(
                host == svc_name || host.starts_with(&format!("{svc_name}.")),
                "{file}: {h} is not the Service {svc_name}"
            );
            assert_eq!(p.parse::<i64>().ok(), Some(port), "{file}: port");
        }
        // APISIX's prefix is one the proxy caches ("/apisix" watches "/apisix/...").
        let prefix = etcd["prefix"].as_str().expect("etcd.prefix");
        assert!(
            prefixes
                .split(',')
                .any(|p| p.trim_end_matches('/') == prefix),
            "{file}: prefix {prefix} not cached ({prefixes})"
        );
        if tls {
            assert_eq!(etcd["tls"]["verify"], true, "{file}: tls.verify");
            assert!(etcd["tls"]["cert"].is_string() && etcd["tls"]["key"].is_string());
        }
        if creds {
            assert!(
                etcd["user"].is_string() && etcd["password"].is_string(),
                "{file}"
            );
        }
        seen.insert((major, tls, creds));
    }
    for major in [2, 3] {
        for (tls, creds) in [(false, false), (true, false), (false, true)] {
            assert!(
                seen.contains(&(major, tls, creds)),
                "no APISIX {major}.x example with tls={tls} credentials={creds}"
            );
        }
    }
}

#[test]
fn dockerfile_is_pinned_stripped_and_non_root() {
    let text = std::fs::read_to_string(deploy("Dockerfile")).expect("Dockerfile");
    let froms: Vec<&str> = text
        .lines()
        .filter(|l| l.trim_start().starts_with("FROM "))
        .collect();
    let last = froms.last().expect("FROM");
    assert!(
        last.contains("@sha256:"),
        "runtime base not pinned by digest: {last}"
    );
    assert!(!last.contains(":latest"), "{last}");
    let user = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("USER "))
        .next_back()
        .expect("USER");
    let uid: u32 = user
        .split(':')
        .next()
        .and_then(|u| u.trim().parse().ok())
        .unwrap_or_else(|| panic!("USER {user} is not numeric (runAsNonRoot needs a uid)"));
    assert_ne!(uid, 0, "root");
    assert!(text.contains("strip "), "binary not stripped");
    assert!(text.contains("--release"), "not a release build");
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).expect(".dockerignore");
    for must in ["target", ".git"] {
        assert!(
            ignore
                .lines()
                .any(|l| l.trim().trim_start_matches("**/") == must),
            ".dockerignore lacks {must}"
        );
    }
}

/// Metric names and the labels queries use on them, from a PromQL expression.
fn query_refs(expr: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut metrics = BTreeSet::new();
    let mut labels = BTreeSet::new();
    let b = expr.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut i = 0;
    while i < b.len() {
        if ident(b[i]) && (i == 0 || !ident(b[i - 1])) {
            let s = i;
            while i < b.len() && ident(b[i]) {
                i += 1;
            }
            let w = &expr[s..i];
            if w.starts_with("etcd_fanout_") || w.starts_with("process_") {
                metrics.insert(w.to_string());
            }
            continue;
        }
        i += 1;
    }
    // Labels in `by (...)` / `without (...)` / `on (...)` / `ignoring (...)` and matchers.
    for kw in [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ] {
        let mut rest = expr;
        while let Some(pos) = rest.find(kw) {
            let before_ok = pos == 0 || !ident(rest.as_bytes()[pos - 1]);
            let after = &rest[pos + kw.len()..];
            let trimmed = after.trim_start();
            if before_ok && trimmed.starts_with('(') && !after.starts_with(|c: char| ident(c as u8))
            {
                if let Some(end) = trimmed.find(')') {
                    for l in trimmed[1..end].split(',') {
                        let l = l.trim();
                        if !l.is_empty() {
                            labels.insert(l.to_string());
                        }
                    }
                }
            }
            rest = &rest[pos + kw.len()..];
        }
    }
    let mut rest = expr;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        for m in rest[open + 1..open + close].split(',') {
            if let Some(eq) = m.find(['=', '!']) {
                let l = m[..eq].trim();
                if !l.is_empty() {
                    labels.insert(l.to_string());
                }
            }
        }
        rest = &rest[open + close..];
    }
    (metrics, labels)
}

/// Labels that Prometheus adds from the target, not the proxy.
const TARGET_LABELS: &[&str] = &[
    "instance",
    "job",
    "pod",
    "namespace",
    "container",
    "service",
];

/// `name -> label names` of every series in a text exposition.
fn exposed(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let entry = out.entry(line[..name_end].to_string()).or_default();
        if line[name_end..].starts_with('{') {
            let close = line.find('}').unwrap_or(line.len());
            for pair in line[name_end + 1..close].split("\",") {
                if let Some((k, _)) = pair.split_once('=') {
                    entry.insert(k.trim().to_string());
                }
            }
        }
    }
    out
}

/// Every (where, expression, legend labels) the dashboard and the alerts query.
fn queries() -> Vec<(String, String, BTreeSet<String>)> {
    let mut out = Vec::new();
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy("grafana/etcd-fanout.json")).expect("dashboard"),
    )
    .expect("dashboard JSON");
    let legend_labels = |s: &str| -> BTreeSet<String> {
        s.split("{{")
            .skip(1)
            .filter_map(|p| p.split_once("}}").map(|(l, _)| l.trim().to_string()))
            .map(|l| l.trim_start_matches("$labels.").to_string())
            .collect()
    };
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            let e = t["expr"].as_str().expect("expr");
            out.push((
                format!("panel {:?}", p["title"]),
                e.to_string(),
                legend_labels(t["legendFormat"].as_str().unwrap_or("")),
            ));
        }
    }
    for v in dash["templating"]["list"].as_array().expect("templating") {
        if let Some(q) = v["query"]
            .as_str()
            .filter(|q| q.starts_with("label_values"))
        {
            // label_values(metric, label)
            let inner = q.trim_start_matches("label_values(").trim_end_matches(')');
            let (m, l) = inner.split_once(',').expect("label_values(m, l)");
            out.push((
                format!("variable {}", v["name"]),
                m.trim().to_string(),
                BTreeSet::from([l.trim().to_string()]),
            ));
        }
    }
    let alerts: String = std::fs::read_to_string(deploy("prometheus/alerts.yaml")).expect("alerts");
    if have_yaml() {
        let a = yaml_docs(&alerts).remove(0);
        for g in a["groups"].as_array().expect("groups") {
            for r in g["rules"].as_array().expect("rules") {
                let mut ann = String::new();
                for v in r["annotations"].as_object().into_iter().flatten() {
                    ann.push_str(v.1.as_str().unwrap_or(""));
                }
                // Templates: only `{{ $labels.x }}` names a label (`$value` does not).
                let used = ann
                    .split("{{")
                    .skip(1)
                    .filter_map(|p| p.trim_start().strip_prefix("$labels."))
                    .filter_map(|p| p.split(|c: char| !c.is_alphanumeric() && c != '_').next())
                    .map(str::to_string)
                    .collect();
                out.push((
                    format!("alert {}", r["alert"]),
                    r["expr"].as_str().expect("expr").to_string(),
                    used,
                ));
            }
        }
    }
    out
}

#[test]
fn dashboard_and_alert_metrics_exist_on_a_live_proxy() {
    if !have_yaml() {
        return;
    }
    let etcd = Etcd::start();
    // A small window, so that a watch from an early revision is caught up from etcd.
    let proxy = Proxy::start_with(
        &etcd.url,
        &["/apisix/", "/other/"],
        &["--history-revisions", "20"],
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut c = Clients::connect(&proxy.url).await;
        // A watcher, then writes it receives (live fan-out: delivery latency), a watch from
        // before the window (a catch-up), then ranges (cached and forwarded) over gRPC and
        // the JSON gateway.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: bytes::Bytes::from_static(b"/apisix/"),
                range_end: testkit::range_end("/apisix/"),
                ..Default::default()
            })),
        })
        .await
        .expect("send");
        let mut stream = c
            .watch
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("watch")
            .into_inner();
        let created = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .expect("created in time")
            .expect("created");
        assert!(created.is_some_and(|r| r.created));
        for i in 0..50 {
            c.kv.put(PutRequest {
                key: format!("/apisix/routes/{i}").into_bytes().into(),
                value: bytes::Bytes::from_static(b"{}"),
                ..Default::default()
            })
            .await
            .expect("put");
        }
        let mut events = 0;
        while events < 50 {
            let r = tokio::time::timeout(Duration::from_secs(20), stream.message())
                .await
                .expect("events in time")
                .expect("watch")
                .expect("open");
            events += r.events.len();
        }
        tx.send(WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: bytes::Bytes::from_static(b"/apisix/"),
                range_end: testkit::range_end("/apisix/"),
                start_revision: 2,
                ..Default::default()
            })),
        })
        .await
        .expect("send");
        let mut replayed = 0;
        while replayed < 50 {
            let r = tokio::time::timeout(Duration::from_secs(30), stream.message())
                .await
                .expect("catch-up events in time")
                .expect("watch")
                .expect("open");
            if r.watch_id == 1 {
                replayed += r.events.len();
            }
        }
        for key in ["/apisix/routes/1", "/elsewhere"] {
            c.kv.range(RangeRequest {
                key: key.as_bytes().to_vec().into(),
                serializable: true,
                ..Default::default()
            })
            .await
            .expect("range");
        }
        drop(tx);
    });
    for body in [
        r#"{"key":"L2FwaXNpeC8=","range_end":"L2FwaXNpeDA="}"#,
        r#"{"key":"L2Vsc2V3aGVyZQ=="}"#,
    ] {
        let r = testkit::http::post(proxy.port, "/v3/kv/range", body);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let text = proxy.metrics();

    if have("promtool", &["--version"]) {
        let mut child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write");
        let out = child.wait_with_output().expect("promtool");
        assert!(
            out.status.success(),
            "promtool check metrics:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let series = exposed(&text);
    // The per-prefix gauges tell the two prefixes apart.
    let sample = |head: &str| -> Option<f64> {
        text.lines()
            .filter_map(|l| l.rsplit_once(' '))
            .find(|(h, _)| *h == head)
            .and_then(|(_, v)| v.parse().ok())
    };
    assert_eq!(
        sample("etcd_fanout_cache_keys{prefix=\"/apisix/\"}"),
        Some(50.0),
        "{text}"
    );
    assert_eq!(
        sample("etcd_fanout_cache_keys{prefix=\"/other/\"}"),
        Some(0.0)
    );
    assert_eq!(
        sample("etcd_fanout_prefix_ready{prefix=\"/other/\"}"),
        Some(1.0)
    );
    assert_eq!(sample("etcd_fanout_ready"), Some(1.0));
    assert_eq!(
        sample("etcd_fanout_prefix_events_received_total{prefix=\"/apisix/\"}"),
        Some(50.0)
    );
    assert!(
        sample("etcd_fanout_connections_accepted_total{protocol=\"http2\"}")
            .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert_eq!(
        sample(&format!(
            "etcd_fanout_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        Some(1.0)
    );
    // The new series count what the load above did.
    let at_least = |head: &str, n: f64| {
        assert!(
            sample(head).is_some_and(|v| v >= n),
            "{head} below {n}:\n{text}"
        );
    };
    at_least(
        "etcd_fanout_prefix_events_sent_total{prefix=\"/apisix/\"}",
        100.0,
    );
    at_least(
        "etcd_fanout_prefix_catchups_total{prefix=\"/apisix/\"}",
        1.0,
    );
    at_least("etcd_fanout_prefix_watchers{prefix=\"/apisix/\"}", 0.0);
    at_least(
        "etcd_fanout_grpc_requests_total{code=\"OK\",method=\"/etcdserverpb.KV/Put\"}",
        50.0,
    );
    at_least(
        "etcd_fanout_grpc_request_duration_seconds_count{method=\"/etcdserverpb.KV/Range\"}",
        2.0,
    );
    at_least(
        "etcd_fanout_http_requests_total{code=\"200\",route=\"/v3/kv/range\"}",
        2.0,
    );
    at_least(
        "etcd_fanout_delivery_latency_seconds_count{wire=\"grpc\"}",
        50.0,
    );
    for kind in ["watch", "catchup_watch", "load", "sync_check", "forwarded"] {
        at_least(
            &format!("etcd_fanout_upstream_requests_total{{kind=\"{kind}\"}}"),
            1.0,
        );
    }
    assert_eq!(
        sample("etcd_fanout_prefix_upstream_lag_revisions{prefix=\"/other/\"}").map(|v| v < 1000.0),
        Some(true)
    );

    let mut problems = Vec::new();
    let qs = queries();
    assert!(qs.len() > 20, "{} queries", qs.len());
    for (place, expr, legend) in qs {
        let (metrics, mut labels) = query_refs(&expr);
        labels.extend(legend);
        if metrics.is_empty() {
            problems.push(format!(
                "{place}: no etcd_fanout_/process_ metric in {expr}"
            ));
        }
        let mut available = BTreeSet::new();
        for m in &metrics {
            let found = ["", "_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| series.get(&format!("{m}{s}")));
            match found {
                Some(ls) => available.extend(ls.iter().cloned()),
                None => problems.push(format!("{place}: metric {m} is not exposed")),
            }
        }
        for l in labels {
            if !TARGET_LABELS.contains(&l.as_str()) && !available.contains(&l) && l != "le" {
                problems.push(format!("{place}: label {l} not on any of {metrics:?}"));
            }
        }
    }
    assert!(problems.is_empty(), "{}\n\n{text}", problems.join("\n"));
}
