//! The deployment artefacts in `deploy/` agree with the configs they ship:
//! probes on the admin port, mounts where the config looks for its files,
//! the data socket where the callers can reach it and nobody else, `EXPOSE`
//! where taskgate listens, stop timeouts above the drain grace, and every
//! shipped config passes `taskgate check`. (`systemd-analyze verify` on
//! the unit runs in `.ci/run`: it needs systemd installed.)

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_yaml::Value as Yaml;

const K8S_YAML: &str = "deploy/kubernetes/taskgate.yaml";
const K8S_SECRET_EXAMPLE: &str = "deploy/kubernetes/secret.example.yaml";
const K8S_TOML: &str = "deploy/kubernetes/taskgate.toml";
const DOCKERFILE: &str = "deploy/Dockerfile";
const DOCKERIGNORE: &str = ".dockerignore";
const SYSTEMD_UNIT: &str = "deploy/systemd/taskgate.service";
const SYSTEMD_TOML: &str = "deploy/systemd/taskgate.toml";

fn path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(path(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

// ---------------------------------------------------------------------------
// The shipped taskgate configs.

struct Toml {
    name: String,
    table: toml::Table,
}

impl Toml {
    fn load(rel: &str) -> Toml {
        Toml::parse(rel, &read(rel))
    }

    fn parse(name: &str, text: &str) -> Toml {
        let table = text
            .parse::<toml::Table>()
            .unwrap_or_else(|e| panic!("{name} is not TOML: {e}"));
        Toml {
            name: name.to_owned(),
            table,
        }
    }

    fn get(&self, key: &str) -> Option<&toml::Value> {
        let mut parts = key.split('.');
        let mut v = self.table.get(parts.next()?)?;
        for p in parts {
            v = v.get(p)?;
        }
        Some(v)
    }

    fn str(&self, key: &str) -> &str {
        self.get(key)
            .and_then(toml::Value::as_str)
            .unwrap_or_else(|| panic!("{}: `{key}` must be set to a string", self.name))
    }

    fn int(&self, key: &str) -> i64 {
        self.get(key)
            .and_then(toml::Value::as_integer)
            .unwrap_or_else(|| panic!("{}: `{key}` must be set to an integer", self.name))
    }

    fn addr(&self, key: &str) -> SocketAddr {
        self.str(key)
            .parse()
            .unwrap_or_else(|e| panic!("{}: `{key}`: {e}", self.name))
    }

    fn audit_dir(&self) -> String {
        parent(self.str("audit.path"))
    }

    /// `listen`: a TCP address or `unix:<path>`.
    fn listen(&self) -> Listen {
        let v = self.str("listen");
        match v.strip_prefix("unix:") {
            Some(path) => {
                assert!(
                    path.starts_with('/'),
                    "{}: socket path {path} is relative",
                    self.name
                );
                Listen::Unix(path.to_owned())
            }
            None => Listen::Tcp(self.addr("listen")),
        }
    }

    /// The TCP ports taskgate listens on.
    fn tcp_ports(&self) -> BTreeSet<u16> {
        let mut ports = BTreeSet::from([self.addr("admin_listen").port()]);
        if let Listen::Tcp(addr) = self.listen() {
            ports.insert(addr.port());
        }
        ports
    }
}

enum Listen {
    Tcp(SocketAddr),
    Unix(String),
}

fn parent(p: &str) -> String {
    Path::new(p)
        .parent()
        .and_then(Path::to_str)
        .unwrap_or_else(|| panic!("{p} has no parent directory"))
        .to_owned()
}

/// `taskgate check --config FILE` with only the given `TASKGATE_*` variables.
fn check(rel: &str, env: &[(&str, &str)]) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_taskgate"));
    cmd.arg("check").arg("--config").arg(path(rel));
    for (key, _) in std::env::vars() {
        if key.starts_with("TASKGATE_") {
            cmd.env_remove(key);
        }
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().expect("run taskgate check");
    assert!(
        out.status.success(),
        "taskgate check rejects {rel} ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------
// Kubernetes.

struct K8s {
    docs: Vec<Yaml>,
}

impl K8s {
    fn load(rel: &str) -> K8s {
        let text = read(rel);
        let docs = serde_yaml::Deserializer::from_str(&text)
            .map(|d| Yaml::deserialize(d).unwrap_or_else(|e| panic!("{rel} is not YAML: {e}")))
            .filter(|d| !d.is_null())
            .collect();
        K8s { docs }
    }

    fn object(&self, kind: &str) -> &Yaml {
        let mut found = self
            .docs
            .iter()
            .filter(|d| d["kind"].as_str() == Some(kind));
        let first = found
            .next()
            .unwrap_or_else(|| panic!("no {kind} in the manifests"));
        assert!(found.next().is_none(), "more than one {kind}");
        first
    }

    fn pod(&self) -> &Yaml {
        &self.object("Deployment")["spec"]["template"]["spec"]
    }

    /// The taskgate container, a native sidecar (restartable init container)
    /// or a plain one.
    fn sidecar(&self) -> &Yaml {
        let pod = self.pod();
        if let Some(c) = named(&pod["initContainers"], "taskgate") {
            assert_eq!(
                c["restartPolicy"].as_str(),
                Some("Always"),
                "taskgate as an init container must be a native sidecar, or the pod never starts"
            );
            return c;
        }
        named(&pod["containers"], "taskgate").expect("a container named taskgate")
    }

    fn volume(&self, name: &str) -> &Yaml {
        named(&self.pod()["volumes"], name).unwrap_or_else(|| panic!("no volume {name}"))
    }

    /// The sidecar's mount of the volume that satisfies `is_kind`, with the volume.
    fn mount_of(&self, is_kind: impl Fn(&Yaml) -> bool) -> (String, &Yaml) {
        let mounts = seq(&self.sidecar()["volumeMounts"]);
        let mut found = mounts.iter().filter_map(|m| {
            let vol = self.volume(s(&m["name"]));
            is_kind(vol).then(|| (s(&m["mountPath"]).to_owned(), vol))
        });
        let first = found.next().expect("the sidecar mounts such a volume");
        assert!(
            found.next().is_none(),
            "the sidecar mounts two such volumes"
        );
        assert!(
            !mounts.iter().any(|m| m.get("subPath").is_some()),
            "subPath mounts never see ConfigMap or Secret updates"
        );
        first
    }

    /// The file a key of a ConfigMap or Secret volume appears as.
    fn file_of_key(&self, source: &Yaml, mount: &str, key: &str) -> String {
        let file = match source.get("items") {
            Some(items) => seq(items)
                .iter()
                .find(|i| i["key"].as_str() == Some(key))
                .map(|i| s(&i["path"]).to_owned())
                .unwrap_or_else(|| panic!("the volume does not project key {key}")),
            None => key.to_owned(),
        };
        format!("{}/{file}", mount.trim_end_matches('/'))
    }

    fn embedded_toml(&self) -> &str {
        s(&self.object("ConfigMap")["data"]["taskgate.toml"])
    }
}

fn named<'a>(list: &'a Yaml, name: &str) -> Option<&'a Yaml> {
    list.as_sequence()?
        .iter()
        .find(|c| c["name"].as_str() == Some(name))
}

fn seq(v: &Yaml) -> &Vec<Yaml> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("expected a list, found {v:?}"))
}

fn s(v: &Yaml) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, found {v:?}"))
}

/// A probe's port: a number, or the name of one of the container's ports.
fn probe_port(container: &Yaml, probe: &Yaml) -> u16 {
    let port = &probe["httpGet"]["port"];
    if let Some(n) = port.as_u64() {
        return u16::try_from(n).expect("port fits u16");
    }
    let p = named(&container["ports"], s(port))
        .unwrap_or_else(|| panic!("probe names an undeclared port {port:?}"));
    u16::try_from(p["containerPort"].as_u64().expect("containerPort")).expect("port fits u16")
}

#[test]
fn configmap_embeds_the_standalone_config_byte_for_byte() {
    let k8s = K8s::load(K8S_YAML);
    assert_eq!(
        k8s.embedded_toml(),
        read(K8S_TOML),
        "the ConfigMap in {K8S_YAML} and {K8S_TOML} differ"
    );
}

#[test]
fn kubernetes_config_passes_taskgate_check() {
    // The token file exists only in the pod; the variable wins over it.
    check(
        K8S_TOML,
        &[("TASKGATE_UPSTREAM_TOKEN", "tg-deploy-test-token")],
    );
}

#[test]
fn probes_hit_the_admin_listener_of_the_shipped_config() {
    let k8s = K8s::load(K8S_YAML);
    let cfg = Toml::parse("the ConfigMap", k8s.embedded_toml());
    let admin = cfg.addr("admin_listen");
    // kubelet probes from outside the pod's network namespace.
    assert!(
        admin.ip().is_unspecified(),
        "admin_listen {admin} is unreachable for kubelet"
    );
    if let Listen::Tcp(listen) = cfg.listen() {
        assert!(listen.ip().is_loopback(), "listen {listen} leaves the pod");
    }

    let c = k8s.sidecar();
    for (probe, want) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let p = &c[probe];
        assert_eq!(p["httpGet"]["path"].as_str(), Some(want), "{probe}");
        assert_eq!(probe_port(c, p), admin.port(), "{probe} port");
    }
    if let Some(p) = c.get("startupProbe") {
        assert!(matches!(
            p["httpGet"]["path"].as_str(),
            Some("/healthz" | "/readyz")
        ));
        assert_eq!(probe_port(c, p), admin.port(), "startupProbe port");
    }
}

#[test]
fn token_file_is_the_secret_volume_file() {
    let k8s = K8s::load(K8S_YAML);
    let cfg = Toml::parse("the ConfigMap", k8s.embedded_toml());
    let (mount, vol) = k8s.mount_of(|v| v.get("secret").is_some());
    let secret = &vol["secret"];
    let example = K8s::load(K8S_SECRET_EXAMPLE);
    let example = example.object("Secret");
    assert_eq!(secret["secretName"], example["metadata"]["name"]);
    let key = "token";
    assert!(
        example["stringData"].get(key).is_some(),
        "{K8S_SECRET_EXAMPLE} has no key {key}"
    );
    assert_eq!(
        k8s.file_of_key(secret, &mount, key),
        cfg.str("upstream.token_file")
    );
}

#[test]
fn audit_log_is_on_the_persistent_volume() {
    let k8s = K8s::load(K8S_YAML);
    let cfg = Toml::parse("the ConfigMap", k8s.embedded_toml());
    let (mount, vol) = k8s.mount_of(|v| v.get("persistentVolumeClaim").is_some());
    assert_eq!(mount, cfg.audit_dir());
    assert_eq!(
        vol["persistentVolumeClaim"]["claimName"],
        k8s.object("PersistentVolumeClaim")["metadata"]["name"]
    );
}

#[test]
fn config_volume_is_where_the_image_reads_its_config() {
    let k8s = K8s::load(K8S_YAML);
    let (mount, vol) = k8s.mount_of(|v| v.get("configMap").is_some());
    let cm = &vol["configMap"];
    assert_eq!(cm["name"], k8s.object("ConfigMap")["metadata"]["name"]);
    let file = k8s.file_of_key(cm, &mount, "taskgate.toml");
    assert_eq!(file, Dockerfile::load().config_path());
}

#[test]
fn grace_period_outlasts_the_drain() {
    let k8s = K8s::load(K8S_YAML);
    let cfg = Toml::parse("the ConfigMap", k8s.embedded_toml());
    let secs = k8s.pod()["terminationGracePeriodSeconds"]
        .as_i64()
        .expect("terminationGracePeriodSeconds is set");
    // The pod's grace is shared: the app drains first (30 s allowed), then
    // taskgate may use shutdown_grace_ms for connections and requests and as
    // much again for the final audit flush.
    assert!(secs * 1000 >= APP_DRAIN_MS + 2 * cfg.int("shutdown_grace_ms"));
}

/// What the example application container may take to drain.
const APP_DRAIN_MS: i64 = 30_000;

#[test]
fn sidecar_runs_locked_down_within_its_memory_budget() {
    let k8s = K8s::load(K8S_YAML);
    let c = k8s.sidecar();
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert!(seq(&sc["capabilities"]["drop"]).iter().any(|c| c == "ALL"));
    let r = &c["resources"];
    assert_eq!(r["limits"]["memory"].as_str(), Some("64Mi"));
    assert_eq!(r["requests"]["memory"].as_str(), Some("32Mi"));
    assert_eq!(r["requests"]["cpu"].as_str(), Some("100m"));
}

#[test]
fn application_calls_the_sidecar_where_it_listens() {
    let k8s = K8s::load(K8S_YAML);
    let cfg = Toml::parse("the ConfigMap", k8s.embedded_toml());
    let apps: Vec<&Yaml> = seq(&k8s.pod()["containers"])
        .iter()
        .filter(|c| c["name"].as_str() != Some("taskgate"))
        .collect();
    assert!(!apps.is_empty(), "no application container");
    let env = |app: &Yaml, key: &str| {
        named(&app["env"], key).unwrap_or_else(|| panic!("{key} is set"))["value"]
            .as_str()
            .expect("a value")
            .to_owned()
    };
    match cfg.listen() {
        Listen::Tcp(addr) => {
            for app in apps {
                assert_eq!(env(app, "VENDOR_BASE_URL"), format!("http://{addr}"));
            }
        }
        Listen::Unix(socket) => {
            // The socket lives in an emptyDir both containers mount at its
            // directory, and the pod's fsGroup lets them open it (0660).
            let dir = parent(&socket);
            let (mount, vol) = k8s.mount_of(|v| v.get("emptyDir").is_some());
            assert_eq!(mount, dir, "the sidecar's socket directory");
            let volume = vol["name"].as_str().expect("volume name").to_owned();
            assert!(
                k8s.pod()["securityContext"]["fsGroup"].as_u64().is_some(),
                "no fsGroup: the application could not open a 0660 socket"
            );
            for app in apps {
                assert_eq!(env(app, "VENDOR_UNIX_SOCKET"), socket);
                let mounted = seq(&app["volumeMounts"]).iter().any(|m| {
                    m["name"].as_str() == Some(volume.as_str())
                        && m["mountPath"].as_str() == Some(dir.as_str())
                });
                assert!(mounted, "the application does not mount {volume} at {dir}");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The Dockerfile.

/// The instructions of the Dockerfile's last stage, continuation lines joined.
struct Dockerfile {
    last_stage: Vec<(String, String)>,
}

impl Dockerfile {
    fn load() -> Dockerfile {
        let mut all = Vec::new();
        let mut pending = String::new();
        for line in read(DOCKERFILE).lines() {
            let line = line.trim();
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            if let Some(head) = line.strip_suffix('\\') {
                pending.push_str(head);
                pending.push(' ');
                continue;
            }
            pending.push_str(line);
            let (instr, args) = pending
                .split_once(char::is_whitespace)
                .unwrap_or((&pending, ""));
            all.push((instr.to_ascii_uppercase(), args.trim().to_owned()));
            pending.clear();
        }
        let from = all
            .iter()
            .rposition(|(i, _)| i == "FROM")
            .expect("a FROM line");
        Dockerfile {
            last_stage: all.split_off(from),
        }
    }

    fn all(&self, instr: &str) -> impl Iterator<Item = &str> {
        self.last_stage
            .iter()
            .filter(move |(i, _)| i == instr)
            .map(|(_, a)| a.as_str())
    }

    fn one(&self, instr: &str) -> &str {
        let mut it = self.all(instr);
        let first = it
            .next()
            .unwrap_or_else(|| panic!("no {instr} in the final stage"));
        assert!(it.next().is_none(), "more than one {instr}");
        first
    }

    fn entrypoint(&self) -> Vec<String> {
        serde_json::from_str(self.one("ENTRYPOINT")).expect("ENTRYPOINT in exec (JSON) form")
    }

    fn config_path(&self) -> String {
        let ep = self.entrypoint();
        let i = ep
            .iter()
            .position(|a| a == "--config")
            .expect("ENTRYPOINT passes --config");
        assert_eq!(ep.get(i - 1).map(String::as_str), Some("serve"));
        ep[i + 1].clone()
    }

    /// COPY lines from the build context: (sources, destination).
    fn context_copies(&self) -> Vec<(Vec<String>, String)> {
        self.all("COPY")
            .filter(|args| !args.contains("--from="))
            .map(|args| {
                let mut words: Vec<String> = args
                    .split_whitespace()
                    .filter(|w| !w.starts_with("--"))
                    .map(str::to_owned)
                    .collect();
                let dest = words.pop().expect("COPY has a destination");
                (words, dest)
            })
            .collect()
    }

    /// The repository file copied to the config path.
    fn shipped_config(&self) -> String {
        let config = self.config_path();
        let (src, _) = self
            .context_copies()
            .into_iter()
            .find(|(_, dest)| *dest == config)
            .unwrap_or_else(|| panic!("nothing is copied to {config}"));
        assert_eq!(src.len(), 1);
        src[0].clone()
    }
}

#[test]
fn dockerfile_exposes_the_ports_its_config_listens_on() {
    let df = Dockerfile::load();
    let cfg = Toml::load(&df.shipped_config());
    let exposed: BTreeSet<u16> = df
        .all("EXPOSE")
        .flat_map(str::split_whitespace)
        .map(|p| p.trim_end_matches("/tcp").parse().expect("a port number"))
        .collect();
    assert_eq!(exposed, cfg.tcp_ports());
}

#[test]
fn dockerfile_paths_match_the_kubernetes_config() {
    let df = Dockerfile::load();
    let k8s = Toml::load(K8S_TOML);
    let shipped = Toml::load(&df.shipped_config());
    let text = read(DOCKERFILE);

    let config = df.config_path();
    assert_eq!(config, "/etc/taskgate/taskgate.toml");
    let token = k8s.str("upstream.token_file");
    assert_eq!(token, "/run/secrets/taskgate/token");
    assert_eq!(shipped.str("upstream.token_file"), token);
    assert!(
        text.contains(token),
        "the Dockerfile does not document {token}"
    );
    let audit = k8s.audit_dir();
    assert_eq!(audit, "/var/lib/taskgate");
    assert_eq!(shipped.audit_dir(), audit);
    let volumes: Vec<String> = df
        .all("VOLUME")
        .flat_map(|v| match serde_json::from_str::<Vec<String>>(v) {
            Ok(list) => list,
            Err(_) => v.split_whitespace().map(str::to_owned).collect(),
        })
        .collect();
    assert!(volumes.contains(&audit), "VOLUME {volumes:?} lacks {audit}");
    // A socket's directory must exist in the image (the root is read-only).
    if let Listen::Unix(socket) = shipped.listen() {
        let dir = parent(&socket);
        assert!(
            text.contains(&format!("/out{dir}")),
            "the Dockerfile does not create {dir}"
        );
    }
}

#[test]
fn image_runs_as_a_non_root_user() {
    let df = Dockerfile::load();
    let user = df.one("USER");
    let name = user.split(':').next().unwrap_or_default();
    assert!(!matches!(name, "" | "0" | "root"), "USER {user}");
}

#[test]
fn build_context_leaves_out_target_and_keeps_what_the_build_copies() {
    let ignore: Vec<String> = read(DOCKERIGNORE)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/').to_owned())
        .collect();
    assert_eq!(
        ignore.first().map(String::as_str),
        Some("*"),
        "an allow-list"
    );
    let allowed: Vec<&str> = ignore.iter().filter_map(|l| l.strip_prefix('!')).collect();
    assert!(
        !allowed.iter().any(|a| a.starts_with("target")),
        "target/ is sent to the builder"
    );

    // Every COPY from the context, in every stage, is allowed in.
    let text = read(DOCKERFILE);
    for line in text.lines().map(str::trim) {
        let Some(args) = line.strip_prefix("COPY ") else {
            continue;
        };
        if args.contains("--from=") {
            continue;
        }
        let mut words: Vec<&str> = args
            .split_whitespace()
            .filter(|w| !w.starts_with("--"))
            .collect();
        words.pop();
        for src in words {
            let src = src.trim_end_matches('/');
            assert!(
                allowed
                    .iter()
                    .any(|a| src == *a || src.starts_with(&format!("{a}/"))),
                "COPY {src} is excluded by {DOCKERIGNORE}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// systemd.

/// A unit file: every `Key=value` of every section, in order.
struct Unit {
    entries: BTreeMap<(String, String), Vec<String>>,
}

impl Unit {
    fn load() -> Unit {
        let mut entries: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        let mut section = String::new();
        for line in read(SYSTEMD_UNIT).lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_owned();
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("not Key=value: {line}"));
            entries
                .entry((section.clone(), k.trim().to_owned()))
                .or_default()
                .push(v.trim().to_owned());
        }
        Unit { entries }
    }

    fn all(&self, key: &str) -> &[String] {
        self.entries
            .get(&("Service".to_owned(), key.to_owned()))
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    fn one(&self, key: &str) -> &str {
        match self.all(key) {
            [v] => v,
            other => panic!("[Service] {key}= must be set once, found {other:?}"),
        }
    }

    /// `TASKGATE_UPSTREAM_TOKEN_FILE` as the unit sets it.
    fn token_file_env(&self) -> &str {
        self.all("Environment")
            .iter()
            .flat_map(|e| e.split_whitespace())
            .find_map(|kv| kv.strip_prefix("TASKGATE_UPSTREAM_TOKEN_FILE="))
            .expect("Environment=TASKGATE_UPSTREAM_TOKEN_FILE=…")
    }
}

#[test]
fn systemd_unit_matches_its_config() {
    let unit = Unit::load();
    let cfg = Toml::load(SYSTEMD_TOML);

    let exec: Vec<&str> = unit.one("ExecStart").split_whitespace().collect();
    assert_eq!(exec[..3], ["/usr/local/bin/taskgate", "serve", "--config"]);
    let config = exec[3];
    let conf_dir = format!("/etc/{}", unit.one("ConfigurationDirectory"));
    assert_eq!(
        parent(config),
        conf_dir,
        "the config is outside ConfigurationDirectory"
    );

    let state_dir = format!("/var/lib/{}", unit.one("StateDirectory"));
    assert_eq!(
        cfg.audit_dir(),
        state_dir,
        "the audit log is outside StateDirectory"
    );
    assert!(
        unit.all("ReadWritePaths")
            .iter()
            .flat_map(|v| v.split_whitespace())
            .any(|p| p == state_dir)
    );
    assert_eq!(unit.one("ProtectSystem"), "strict");

    // A data socket goes in the RuntimeDirectory (writable despite
    // ProtectSystem, removed at stop), which the unit's group may enter.
    if let Listen::Unix(socket) = cfg.listen() {
        let run_dir = format!("/run/{}", unit.one("RuntimeDirectory"));
        assert_eq!(
            parent(&socket),
            run_dir,
            "the socket is outside RuntimeDirectory"
        );
        let mode = u32::from_str_radix(unit.one("RuntimeDirectoryMode"), 8).expect("octal mode");
        assert_eq!(mode & 0o050, 0o050, "the group cannot reach the socket");
        assert_eq!(mode & 0o007, 0, "others can reach the socket");
        assert!(
            !unit.one("Group").is_empty(),
            "without a static Group= the socket's group is the dynamic one"
        );
    }

    // The token: a credential, handed over through the environment.
    let cred = unit
        .one("LoadCredential")
        .split(':')
        .next()
        .unwrap_or_default();
    assert_eq!(unit.token_file_env(), format!("%d/{cred}"));
    assert!(
        cfg.get("upstream.token_file").is_none(),
        "{SYSTEMD_TOML}: upstream.token_file is overridden by the unit's TASKGATE_UPSTREAM_TOKEN_FILE"
    );

    assert_eq!(unit.one("KillSignal"), "SIGTERM");
    assert_eq!(unit.one("ExecReload"), "/bin/kill -HUP $MAINPID");
    let stop: i64 = unit
        .one("TimeoutStopSec")
        .parse()
        .expect("TimeoutStopSec in plain seconds");
    // Drain (shutdown_grace_ms) plus the bounded final audit flush (as much again).
    assert!(stop * 1000 > 2 * cfg.int("shutdown_grace_ms"));
}

#[test]
fn systemd_config_passes_taskgate_check_with_the_units_credential() {
    // Stand in for systemd: the credential directory (%d) holds the token.
    let unit = Unit::load();
    let creds = tempfile::tempdir().expect("temp dir");
    let token_file = unit
        .token_file_env()
        .replace("%d", creds.path().to_str().expect("utf-8 temp path"));
    std::fs::write(&token_file, "tg-deploy-test-token\n").expect("write token");
    check(
        SYSTEMD_TOML,
        &[("TASKGATE_UPSTREAM_TOKEN_FILE", &token_file)],
    );
}
