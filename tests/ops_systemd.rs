//! The operations files (docs/operations.md): the systemd units pass `systemd-analyze verify`
//! and agree with the production example configuration, that configuration passes `-t` with its
//! environment, and scripts/install.sh installs into a temporary root idempotently.
//!
//! Nothing here starts a unit: the test machine need not run systemd as PID 1.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_fhir-gateway");
const UNITS: [&str; 2] = ["fhir-gateway.service", "fhir-gateway@.service"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// A fresh directory under the system temp dir (removed by the caller on success).
fn temp_dir(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let d = std::env::temp_dir().join(format!("fgw-ops-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool} >/dev/null")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Fails the test when a tool it needs is missing: a check that cannot run is a failure, never a
/// silent pass (Debian's `systemd` package has them all).
fn require(tool: &str, why: &str) {
    assert!(
        have(tool),
        "{tool} is not installed ({why}): apt-get install systemd"
    );
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The environment the example configuration needs, with values `-t` accepts (the upstream is
/// an IP literal, so no DNS is involved).
const EXAMPLE_ENV: [(&str, &str); 8] = [
    (
        "FHIR_GATEWAY_PUBLIC_BASE_URL",
        "https://fhir.example.org/fhir",
    ),
    (
        "FHIR_GATEWAY_TENANT_ID",
        "00000000-0000-0000-0000-000000000000",
    ),
    (
        "FHIR_GATEWAY_API_APP_ID",
        "11111111-1111-1111-1111-111111111111",
    ),
    (
        "FHIR_GATEWAY_API_APP_ID_URI",
        "api://11111111-1111-1111-1111-111111111111",
    ),
    ("FHIR_UPSTREAM_URL", "http://127.0.0.1:8090/fhir"),
    ("FHIR_UPSTREAM_CLIENT_ID", "gateway-client"),
    (
        "FHIR_UPSTREAM_CLIENT_SECRET",
        "s3cret value # with; specials",
    ),
    (
        "FHIR_UPSTREAM_SCOPE",
        "https://ws-fhir.fhir.azurehealthcareapis.com/.default",
    ),
];

/// `${NAME}` references on the non-comment lines of a configuration file.
fn env_refs(yaml: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in yaml.lines().filter(|l| !l.trim_start().starts_with('#')) {
        let mut rest = line;
        while let Some(i) = rest.find("${") {
            let after = &rest[i + 2..];
            let end = after.find('}').expect("closed reference");
            out.insert(after[..end].to_string());
            rest = &after[end..];
        }
    }
    out
}

/// `Key=value` settings of a unit file, every occurrence of each key in order.
fn unit_settings(unit: &str) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in unit.lines() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') || l.starts_with('[') {
            continue;
        }
        let (k, v) = l.split_once('=').expect("Key=value");
        m.entry(k.to_string()).or_default().push(v.to_string());
    }
    m
}

fn one<'a>(m: &'a BTreeMap<String, Vec<String>>, key: &str) -> &'a str {
    let v = m.get(key).unwrap_or_else(|| panic!("{key}= missing"));
    assert_eq!(v.len(), 1, "{key}= given {} times", v.len());
    &v[0]
}

fn yaml(text: &str) -> serde_yaml::Value {
    serde_yaml::from_str(text).expect("the example is valid YAML")
}

fn at<'a>(v: &'a serde_yaml::Value, path: &[&str]) -> &'a serde_yaml::Value {
    path.iter().fold(v, |v, k| {
        v.get(k).unwrap_or_else(|| panic!("{path:?} missing"))
    })
}

fn at_str<'a>(v: &'a serde_yaml::Value, path: &[&str]) -> &'a str {
    at(v, path).as_str().expect("a string")
}

fn at_u64(v: &serde_yaml::Value, path: &[&str]) -> u64 {
    at(v, path).as_u64().expect("a number")
}

fn seconds(v: &str) -> u64 {
    let v = v.trim();
    v.strip_suffix('s')
        .unwrap_or(v)
        .parse()
        .unwrap_or_else(|_| panic!("{v:?}: plain seconds expected"))
}

#[test]
fn units_pass_systemd_analyze_verify() {
    require("systemd-analyze", "it verifies the units");
    // The units name /usr/local/bin/fhir-gateway, which `verify` wants to be executable: check
    // copies that point at the binary cargo built.
    let dir = temp_dir("verify");
    for u in UNITS {
        let unit = read(&format!("systemd/{u}")).replace("/usr/local/bin/fhir-gateway", BIN);
        std::fs::write(dir.join(u), unit).unwrap();
    }
    // The template is checked through an instance; systemd-analyze finds the template next to it.
    for u in ["fhir-gateway.service", "fhir-gateway@a.service"] {
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(dir.join(u))
            .env("SYSTEMD_LOG_COLOR", "0")
            .output()
            .unwrap();
        let all = text(&out);
        assert!(out.status.success(), "verify {u}: {all}");
        // Warnings (unknown keys, bad values) do not change the exit status: none may concern us.
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let ours: Vec<&str> = stderr
            .lines()
            .chain(stdout.lines())
            .filter(|l| l.contains("fhir-gateway"))
            .collect();
        assert!(ours.is_empty(), "verify {u} complained: {ours:#?}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn units_follow_pingoras_forking_pattern_and_the_example() {
    let example = yaml(&read("conf/fhir-gateway.systemd.yaml"));
    let drain = at_u64(&example, &["health", "drain_seconds"]);
    let grace = at_u64(&example, &["pingora", "grace_period_seconds"]);
    let shutdown = at_u64(&example, &["pingora", "graceful_shutdown_timeout_seconds"]);
    assert!(
        at(&example, &["pingora", "daemon_wait_for_ready"])
            .as_bool()
            .unwrap(),
        "start and reload wait for the daemon to be up (tests/upgrade.rs runs that sequence)"
    );
    assert!(at(&example, &["pingora"]).get("user").is_none());
    assert!(at(&example, &["pingora"]).get("error_log").is_none());

    for (u, inst) in [
        ("fhir-gateway.service", None),
        ("fhir-gateway@.service", Some("%i")),
    ] {
        let m = unit_settings(&read(&format!("systemd/{u}")));
        let run = match inst {
            None => "/run/fhir-gateway".to_string(),
            Some(i) => format!("/run/fhir-gateway/{i}"),
        };
        let conf = match inst {
            None => "/etc/fhir-gateway/fhir-gateway.yaml".to_string(),
            Some(i) => format!("/etc/fhir-gateway/{i}.yaml"),
        };
        assert_eq!(one(&m, "Type"), "forking", "{u}");
        assert_eq!(one(&m, "PIDFile"), format!("{run}/fhir-gateway.pid"), "{u}");
        assert_eq!(
            one(&m, "RuntimeDirectory"),
            run.trim_start_matches("/run/"),
            "{u}"
        );
        assert_eq!(one(&m, "RuntimeDirectoryPreserve"), "yes", "{u}");
        assert_eq!(
            one(&m, "ExecStartPre"),
            format!("/usr/local/bin/fhir-gateway -t -c {conf}"),
            "{u}"
        );
        assert_eq!(
            one(&m, "ExecStart"),
            format!("/usr/local/bin/fhir-gateway -d -c {conf}"),
            "{u}"
        );
        let reload = &m["ExecReload"];
        assert_eq!(
            reload[..3],
            [
                format!("/usr/local/bin/fhir-gateway -t -c {conf}"),
                format!("/usr/local/bin/fhir-gateway -u -d -c {conf}"),
                "/bin/kill -QUIT $MAINPID".to_string(),
            ],
            "{u}: check, the new process with -u -d, then SIGQUIT (Pingora's order)"
        );
        assert!(
            reload.len() == 4 && reload[3].contains(&format!("{run}/fhir-gateway.pid")),
            "{u}: the reload waits for the new PID file"
        );
        assert_eq!(one(&m, "KillSignal"), "SIGTERM", "{u}");
        let stop = seconds(one(&m, "TimeoutStopSec"));
        assert!(
            stop > drain + grace + shutdown,
            "{u}: TimeoutStopSec={stop} must exceed drain {drain} + grace {grace} + shutdown {shutdown}"
        );
        assert_eq!(one(&m, "User"), "fhir-gateway", "{u}");
        assert_eq!(one(&m, "Group"), "fhir-gateway", "{u}");
        assert_eq!(one(&m, "LimitNOFILE"), "65536", "{u}");
        assert!(m["EnvironmentFile"].contains(&"/etc/fhir-gateway/fhir-gateway.env".to_string()));
        for (k, v) in [
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("PrivateDevices", "yes"),
            ("ProtectKernelTunables", "yes"),
            ("ProtectKernelModules", "yes"),
            ("ProtectKernelLogs", "yes"),
            ("ProtectControlGroups", "yes"),
            ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
            ("RestrictNamespaces", "yes"),
            ("LockPersonality", "yes"),
            ("MemoryDenyWriteExecute", "yes"),
            ("SystemCallArchitectures", "native"),
            ("CapabilityBoundingSet", ""),
        ] {
            assert_eq!(one(&m, k), v, "{u}: {k}");
        }
    }

    // The plain unit and the example agree on every path.
    let m = unit_settings(&read("systemd/fhir-gateway.service"));
    assert_eq!(
        at_str(&example, &["pingora", "pid_file"]),
        one(&m, "PIDFile")
    );
    assert_eq!(
        at_str(&example, &["pingora", "upgrade_sock"]),
        "/run/fhir-gateway/upgrade.sock"
    );
    let state = format!("/var/lib/{}", one(&m, "StateDirectory"));
    for p in [
        &["pingora", "working_directory"][..],
        &["events", "file"],
        &["events", "spool", "dir"],
    ] {
        assert!(
            at_str(&example, p).starts_with(&state),
            "{p:?} must be under {state} (ProtectSystem=strict)"
        );
    }
    assert_eq!(at_str(&example, &["metrics", "listen"]), "127.0.0.1:9091");
}

#[test]
fn example_configuration_passes_t_with_its_environment() {
    let path = repo().join("conf/fhir-gateway.systemd.yaml");
    let yaml_text = read("conf/fhir-gateway.systemd.yaml");
    let wanted = env_refs(&yaml_text);
    let given: BTreeSet<String> = EXAMPLE_ENV.iter().map(|(k, _)| k.to_string()).collect();
    assert_eq!(wanted, given, "the variables the example uses");

    let out = Command::new(BIN)
        .arg("-t")
        .arg("-c")
        .arg(&path)
        .env_clear()
        .envs(EXAMPLE_ENV)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration OK"));

    // Without the environment, every missing variable is named with its line.
    let out = Command::new(BIN)
        .arg("-t")
        .arg("-c")
        .arg(&path)
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    for v in &wanted {
        assert!(
            err.contains(&format!("environment variable {v} is not set")),
            "{v}: {err}"
        );
    }
}

/// What must not change between two runs of the install script.
#[derive(Debug, PartialEq)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    link: Option<PathBuf>,
}

/// Path → metadata of everything under `root`.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Meta> {
    fn walk(p: &Path, root: &Path, out: &mut BTreeMap<PathBuf, Meta>) {
        let md = std::fs::symlink_metadata(p).unwrap();
        let link = md
            .file_type()
            .is_symlink()
            .then(|| std::fs::read_link(p).unwrap());
        out.insert(
            p.strip_prefix(root).unwrap().to_path_buf(),
            Meta {
                mode: md.mode(),
                uid: md.uid(),
                gid: md.gid(),
                size: md.size(),
                mtime: (md.mtime(), md.mtime_nsec()),
                link,
            },
        );
        if md.is_dir() {
            for e in std::fs::read_dir(p).unwrap() {
                walk(&e.unwrap().path(), root, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    if root.exists() {
        walk(root, root, &mut out);
    }
    out
}

fn install(root: &Path, extra: &[&str]) -> Output {
    Command::new("bash")
        .arg(repo().join("scripts/install.sh"))
        .arg("--root")
        .arg(root)
        .arg("--binary")
        .arg(BIN)
        .args(extra)
        .env_remove("DESTDIR")
        .output()
        .unwrap()
}

/// KEY=value lines of an env file (comments and blanks skipped).
fn env_file_keys(text: &str) -> BTreeSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split_once('=').expect("KEY=value").0.to_string())
        .collect()
}

fn set_env_value(file: &Path, key: &str, value: &str) {
    let t = std::fs::read_to_string(file).unwrap();
    let t: Vec<String> = t
        .lines()
        .map(|l| {
            if l.starts_with(&format!("{key}=")) {
                format!("{key}={value}")
            } else {
                l.to_string()
            }
        })
        .collect();
    std::fs::write(file, t.join("\n") + "\n").unwrap();
}

#[test]
fn install_script_is_idempotent_in_a_temporary_root() {
    require("systemd-sysusers", "it creates the service user in --root");
    require("systemctl", "it enables the units in --root");
    // The configuration's owner and group are part of what is checked: that takes root (CI runs
    // as root).
    assert_eq!(
        effective_uid(),
        0,
        "the install test sets and checks root:fhir-gateway ownership: run it as root"
    );
    let base = temp_dir("install");
    let root = base.join("root");

    // A dry run changes nothing, not even the root directory.
    let out = install(&root, &["--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!root.exists(), "a dry run created {}", root.display());
    assert!(String::from_utf8_lossy(&out.stdout).contains("would: "));

    // First run: everything installed; the placeholder FHIR server name does not resolve, so the
    // check fails and nothing is enabled (exit 3).
    let out = install(&root, &[]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing enabled or started"), "{err}");
    let wants = root.join("etc/systemd/system/multi-user.target.wants/fhir-gateway.service");
    assert!(!wants.exists(), "enabled despite the failed check");
    for p in [
        "usr/local/bin/fhir-gateway",
        "usr/local/lib/systemd/system/fhir-gateway.service",
        "usr/local/lib/systemd/system/fhir-gateway@.service",
        "usr/local/lib/sysusers.d/fhir-gateway.conf",
        "usr/local/share/doc/fhir-gateway/operations.md",
        "etc/fhir-gateway/fhir-gateway.yaml",
        "etc/fhir-gateway/fhir-gateway.env",
    ] {
        assert!(root.join(p).is_file(), "{p} not installed");
    }
    assert_eq!(
        std::fs::read(root.join("usr/local/lib/systemd/system/fhir-gateway.service")).unwrap(),
        std::fs::read(repo().join("systemd/fhir-gateway.service")).unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/fhir-gateway/fhir-gateway.yaml")).unwrap(),
        read("conf/fhir-gateway.systemd.yaml")
    );

    // The service account: one, without a login shell.
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    let entries: Vec<&str> = passwd
        .lines()
        .filter(|l| l.starts_with("fhir-gateway:"))
        .collect();
    assert_eq!(entries.len(), 1, "{passwd}");
    assert!(entries[0].ends_with(":/usr/sbin/nologin"), "{}", entries[0]);
    let gid: u32 = std::fs::read_to_string(root.join("etc/group"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("fhir-gateway:"))
        .and_then(|l| l.split(':').nth(2))
        .and_then(|g| g.parse().ok())
        .expect("group fhir-gateway");

    // The configuration: root:fhir-gateway, 0750 / 0640; the env file defines exactly the
    // variables the example uses.
    let env_path = root.join("etc/fhir-gateway/fhir-gateway.env");
    for (p, mode) in [
        ("etc/fhir-gateway", 0o750),
        ("etc/fhir-gateway/fhir-gateway.yaml", 0o640),
        ("etc/fhir-gateway/fhir-gateway.env", 0o640),
    ] {
        let md = std::fs::metadata(root.join(p)).unwrap();
        assert_eq!(md.mode() & 0o7777, mode, "{p}");
        assert_eq!((md.uid(), md.gid()), (0, gid), "{p}");
    }
    let env_text = std::fs::read_to_string(&env_path).unwrap();
    assert_eq!(
        env_file_keys(&env_text),
        env_refs(&read("conf/fhir-gateway.systemd.yaml")),
        "the env template and the example's variables"
    );

    // The operator fills in the env file (and adds a line of their own); the next run checks
    // the file with it, enables the unit, and keeps the env file as it is.
    set_env_value(&env_path, "FHIR_UPSTREAM_URL", "http://127.0.0.1:8090/fhir");
    set_env_value(
        &env_path,
        "FHIR_UPSTREAM_CLIENT_SECRET",
        "\"quoted secret # not a comment\"",
    );
    let mut edited = std::fs::read_to_string(&env_path).unwrap();
    edited.push_str("# site note: kept by every install\n");
    std::fs::write(&env_path, &edited).unwrap();
    let out = install(&root, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("fhir-gateway.yaml: configuration OK"),
        "{}",
        text(&out)
    );
    assert!(wants.is_symlink(), "fhir-gateway.service not enabled");
    assert_eq!(std::fs::read_to_string(&env_path).unwrap(), edited);

    // Again: nothing changes, byte for byte and timestamp for timestamp.
    let before = snapshot(&root);
    let out = install(&root, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("nothing to do: already installed"),
        "{stdout}"
    );
    assert!(!stdout.lines().any(|l| l.starts_with("+ ")), "{stdout}");
    assert_eq!(snapshot(&root), before, "the second run changed something");

    // A dry run on the installed root has nothing to announce either.
    let out = install(&root, &["--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("would: "),
        "{}",
        text(&out)
    );
    assert_eq!(snapshot(&root), before);

    // An instance of the template: its own ports and paths, which match the template unit.
    let out = install(&root, &["--instance", "a:8081:9101"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let a_text = std::fs::read_to_string(root.join("etc/fhir-gateway/a.yaml")).unwrap();
    let a = yaml(&a_text);
    let tmpl = unit_settings(&read("systemd/fhir-gateway@.service"));
    assert_eq!(
        at_str(&a, &["pingora", "pid_file"]),
        one(&tmpl, "PIDFile").replace("%i", "a")
    );
    assert_eq!(
        at_str(&a, &["pingora", "upgrade_sock"]),
        "/run/fhir-gateway/a/upgrade.sock"
    );
    let state = format!(
        "/var/lib/{}",
        one(&tmpl, "StateDirectory").replace("%i", "a")
    );
    assert_eq!(state, "/var/lib/fhir-gateway/a");
    for p in [
        &["pingora", "working_directory"][..],
        &["events", "file"],
        &["events", "spool", "dir"],
    ] {
        assert!(at_str(&a, p).starts_with(&state), "{p:?}: {a_text}");
    }
    assert_eq!(
        at(&a, &["listen"])[0].get("addr").unwrap().as_str(),
        Some("0.0.0.0:8081")
    );
    assert_eq!(at_str(&a, &["metrics", "listen"]), "127.0.0.1:9101");
    let out = Command::new(BIN)
        .arg("-t")
        .arg("-c")
        .arg(root.join("etc/fhir-gateway/a.yaml"))
        .env_clear()
        .envs(EXAMPLE_ENV)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(root
        .join("etc/systemd/system/multi-user.target.wants/fhir-gateway@a.service")
        .is_symlink());
    // A second instance may not take a port an existing one uses.
    let out = install(&root, &["--instance", "b:8081:9102"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("port 8081 is already used"));
    assert!(!root.join("etc/fhir-gateway/b.yaml").exists());
    // And the instance install is idempotent too.
    let before = snapshot(&root);
    let out = install(&root, &["--instance", "a"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to do"));
    assert_eq!(snapshot(&root), before);

    // A new binary: installed, the previous one kept for a rollback, the configuration kept.
    let newer = base.join("fhir-gateway-newer");
    let mut bytes = std::fs::read(BIN).unwrap();
    bytes.extend_from_slice(b"\n# a different build\n");
    std::fs::write(&newer, &bytes).unwrap();
    std::fs::set_permissions(&newer, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let conf_before = std::fs::read(root.join("etc/fhir-gateway/fhir-gateway.yaml")).unwrap();
    let out = Command::new("bash")
        .arg(repo().join("scripts/install.sh"))
        .arg("--root")
        .arg(&root)
        .arg("--binary")
        .arg(&newer)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        std::fs::read(root.join("usr/local/bin/fhir-gateway")).unwrap(),
        bytes
    );
    assert_eq!(
        std::fs::read(root.join("usr/local/bin/fhir-gateway.prev")).unwrap(),
        std::fs::read(BIN).unwrap()
    );
    assert_eq!(
        std::fs::read(root.join("etc/fhir-gateway/fhir-gateway.yaml")).unwrap(),
        conf_before
    );

    let _ = std::fs::remove_dir_all(base);
}

/// The effective uid, from `id -u` (no libc call needed in a test).
fn effective_uid() -> u32 {
    let out = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}
