//! `fhir-gateway -c <yaml> [-t] [-d] [-u]`: Pingora's command line, with `-t` validating the
//! whole gateway configuration (not only Pingora's part) before anything binds.

use async_trait::async_trait;
use clap::Parser;
use fhir_gateway::config;
use fhir_gateway::health::{HealthTask, JwksTask};
use fhir_gateway::proxy::FhirProxy;
use fhir_gateway::Gateway;
use pingora_core::server::configuration::Opt;
use pingora_core::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora_core::services::background::background_service;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};

// glibc's arenas lock when one thread frees what another allocated (the access-log, audit and
// events threads free what the workers built); mimalloc frees to the owning thread's heap.
// Measured in load-tests (issue 15).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc reads its options from the environment as the process starts, before `main`, and
/// by default commits its first arena whole: about 8 MiB more idle RSS than glibc. Committing
/// on use keeps the idle gateway under its 30 MB budget; the option can only be given before
/// start, so the process runs itself again once, with it set (the same pid and descriptors).
/// An operator's own `MIMALLOC_ARENA_EAGER_COMMIT` is left as it is.
fn tune_allocator() {
    use std::os::unix::process::CommandExt;
    const OPTION: &str = "MIMALLOC_ARENA_EAGER_COMMIT";
    if std::env::var_os(OPTION).is_some() {
        return;
    }
    let mut argv = std::env::args_os();
    let argv0 = argv.next().unwrap_or_default();
    // /proc/self/exe: still this binary when an upgrade replaced the file on disk.
    let err = std::process::Command::new("/proc/self/exe")
        .arg0(argv0)
        .args(argv)
        .env(OPTION, "0")
        .exec();
    // `exec` returns only when it failed: go on with mimalloc's defaults.
    eprintln!("fhir-gateway: could not restart with {OPTION}=0 ({err}); continuing");
}

#[derive(Parser, Debug)]
#[command(
    name = "fhir-gateway",
    version,
    about = "Secure gateway for FHIR servers"
)]
struct Cli {
    /// The configuration file.
    #[arg(short, long, default_value = "/etc/fhir-gateway/fhir-gateway.yaml")]
    conf: PathBuf,
    /// Validate the configuration and exit (0 = valid).
    #[arg(short, long)]
    test: bool,
    /// Run in the background (systemd Type=forking).
    #[arg(short, long)]
    daemon: bool,
    /// Take over the listening sockets of a running instance (zero-downtime upgrade).
    #[arg(short, long)]
    upgrade: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// The audit trail.
    Audit {
        #[command(subcommand)]
        what: AuditCommand,
    },
}

#[derive(clap::Subcommand, Debug)]
enum AuditCommand {
    /// Checks a trail file, or the topic of `audit.kafka`: deleted, edited and reordered
    /// records, forged checkpoints. Exit 0: intact; 1: findings (listed); 2: cannot read.
    Verify {
        /// The JSON-lines trail (`audit.file`); or give --topic and --bootstrap.
        #[arg(required_unless_present = "topic", conflicts_with = "topic")]
        file: Option<PathBuf>,
        /// The checkpoint key (`audit.key_file`).
        #[arg(long)]
        key_file: PathBuf,
        /// Read this topic (every partition, from its beginning to its end now).
        #[arg(long, requires = "bootstrap")]
        topic: Option<String>,
        /// The broker (`host:port[,...]`).
        #[arg(long)]
        bootstrap: Option<String>,
        /// Accepted for familiarity: a topic is always read from its beginning.
        #[arg(long)]
        from_beginning: bool,
        /// The environment variable holding an Event Hubs connection string (SASL_SSL).
        #[arg(long)]
        connection_string_env: Option<String>,
        /// A librdkafka property, `name=value` (repeatable).
        #[arg(long = "property", value_name = "NAME=VALUE")]
        properties: Vec<String>,
    },
}

fn read_key(key_file: &std::path::Path) -> Option<Vec<u8>> {
    match std::fs::read(key_file) {
        Ok(k) => Some(k.trim_ascii().to_vec()),
        Err(e) => {
            eprintln!("{}: {e}", key_file.display());
            None
        }
    }
}

fn verify_topic(src: fhir_gateway::audit::topic::Source, key_file: &std::path::Path) -> ExitCode {
    let Some(key) = read_key(key_file) else {
        return ExitCode::from(2);
    };
    match fhir_gateway::audit::topic::verify_topic(&src, &key) {
        Ok((report, at)) => {
            fhir_gateway::audit::topic::print(&src.topic, &report, &at);
            if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

fn audit_verify(file: &std::path::Path, key_file: &std::path::Path) -> ExitCode {
    let Some(key) = read_key(key_file) else {
        return ExitCode::from(2);
    };
    let report = match std::fs::File::open(file)
        .and_then(|f| fhir_gateway::audit::verify::verify(std::io::BufReader::new(f), &key))
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{}: {e}", file.display());
            return ExitCode::from(2);
        }
    };
    for (line, what) in &report.findings {
        println!("{}:{line}: {what}", file.display());
    }
    println!(
        "{}: {} records, {} checkpoints, {} finding(s); {} record(s) after the last valid checkpoint (protected by the chain only)",
        file.display(),
        report.records,
        report.checkpoints,
        report.findings.len(),
        report.unsigned_tail
    );
    if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    if let Some(Command::Audit {
        what:
            AuditCommand::Verify {
                file,
                key_file,
                topic,
                bootstrap,
                connection_string_env,
                properties,
                ..
            },
    }) = &cli.command
    {
        if let (Some(topic), Some(bootstrap)) = (topic, bootstrap) {
            let mut props = std::collections::BTreeMap::new();
            for p in properties {
                let Some((k, v)) = p.split_once('=') else {
                    eprintln!("--property {p}: NAME=VALUE");
                    return ExitCode::from(2);
                };
                props.insert(k.to_string(), v.to_string());
            }
            let connection_string = match connection_string_env {
                Some(var) => match std::env::var(var) {
                    Ok(v) => Some(v),
                    Err(e) => {
                        eprintln!("{var}: {e}");
                        return ExitCode::from(2);
                    }
                },
                None => None,
            };
            let src = fhir_gateway::audit::topic::Source {
                bootstrap: bootstrap.clone(),
                topic: topic.clone(),
                connection_string,
                properties: props,
            };
            return verify_topic(src, key_file);
        }
        let Some(file) = file else {
            eprintln!("audit verify: a FILE, or --topic and --bootstrap");
            return ExitCode::from(2);
        };
        return audit_verify(file, key_file);
    }
    let conf_name = cli.conf.display().to_string();
    let modules = fhir_gateway_modules::builtin::Registry::builtin();
    let mut cfg = match config::load(&cli.conf, &modules) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors.0 {
                match e.line {
                    Some(l) => eprintln!("{conf_name}:{l}: {}", e.message),
                    None => eprintln!("{conf_name}: {}", e.message),
                }
            }
            eprintln!(
                "{conf_name}: configuration invalid ({} error(s))",
                errors.0.len()
            );
            return ExitCode::from(2);
        }
    };
    // `-d` changes the working directory to `/`: relative paths are fixed now.
    if let Ok(cwd) = std::env::current_dir() {
        cfg.events.absolutize(&cwd);
    }
    if let Err(e) = fhir_gateway::events::check(&cfg.events) {
        eprintln!("{conf_name}: {e}");
        return ExitCode::from(2);
    }
    if let Some(Err(e)) = cfg
        .built
        .audit
        .sink
        .as_ref()
        .map(fhir_gateway::audit::sink::check)
    {
        eprintln!("{conf_name}: {e}");
        return ExitCode::from(2);
    }
    let gateway = match Gateway::new(&cfg) {
        Ok(g) => Arc::new(g),
        Err(e) => {
            eprintln!("{conf_name}: {e}");
            return ExitCode::from(2);
        }
    };
    let server_conf = match cfg.server_conf() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{conf_name}: pingora: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.test {
        println!("{conf_name}: configuration OK");
        return ExitCode::SUCCESS;
    }

    let level = config::log_level(&cfg.logging.level).unwrap_or(log::LevelFilter::Info);
    env_logger::Builder::new()
        .filter_level(level)
        .parse_default_env()
        .init();
    if cfg.auth.as_ref().map(|a| a.mode) == Some(config::AuthMode::InsecureDev) {
        log::warn!("auth.mode insecure_dev: callers are NOT authenticated (loopback only)");
    }
    if cfg.bulk.binding_key_file.is_none() {
        log::info!(
            "bulk.binding_key_file not set: Bulk Data status and file URLs are signed with this \
             process's random key; several instances behind a load balancer need a shared key"
        );
    }

    let opt = Opt {
        upgrade: cli.upgrade,
        daemon: cli.daemon,
        nocapture: false,
        test: false,
        conf: None,
    };
    let mut server = Server::new_with_opt_and_conf(opt, server_conf);
    // Bootstrap (taking over an old process's sockets with -u) runs as a service, after the
    // daemon fork: that is what lets `daemon_wait_for_ready` release the -d parent when the
    // child is up, before it asks the old process for its listeners.
    let bootstrap = server.bootstrap_as_a_service();

    let mut proxy = pingora_proxy::http_proxy_service_with_name(
        &server.configuration,
        FhirProxy::new(gateway.clone()),
        "fhir-gateway",
    );
    for l in &cfg.listen {
        match &l.tls {
            None => proxy.add_tcp(&l.addr),
            Some(tls) => {
                if let Err(e) = proxy.add_tls(&l.addr, &tls.cert_file, &tls.key_file) {
                    eprintln!("{conf_name}: listen {}: {e}", l.addr);
                    return ExitCode::from(2);
                }
            }
        }
    }
    let jwks = background_service(
        "jwks",
        JwksTask {
            gateway: gateway.clone(),
        },
    );
    server.add_service(jwks);
    let events = background_service(
        "events",
        fhir_gateway::events::EventsTask {
            gateway: gateway.clone(),
            events: gateway.event_queue.clone(),
        },
    );
    server.add_service(events);
    // Only when configured: every background service is a thread with a runtime of its own
    // (idle memory).
    if gateway.trail.as_ref().is_some_and(|t| t.fhir.is_some()) {
        let audit_fhir = background_service(
            "audit-fhir",
            fhir_gateway::audit::fhir::FhirSinkTask {
                gateway: gateway.clone(),
            },
        );
        server.add_service(audit_fhir);
    }
    let drain_gateway = gateway.clone();
    let health = background_service(
        "health",
        HealthTask {
            gateway,
            interval: Duration::from_millis(cfg.health.upstream_check_interval_ms),
        },
    );
    server.add_service(health);
    if let Some(addr) = &cfg.metrics.listen {
        let mut metrics = pingora_prometheus::prometheus_http_service();
        metrics.add_tcp(addr);
        server.add_service(metrics).add_dependency(&bootstrap);
    }
    server.add_service(proxy).add_dependency(&bootstrap);
    server.run(RunArgs {
        shutdown_signal: Box::new(Draining {
            gateway: drain_gateway,
            drain: Duration::from_secs(cfg.health.drain_seconds),
        }),
    });
    ExitCode::SUCCESS
}

/// Pingora's signals, with a drain in front of SIGTERM: `/readyz` fails and keep-alive
/// connections close while the listener still accepts, so a load balancer moves traffic away
/// before anything is refused. SIGQUIT (upgrade) hands the listeners over at once; the old
/// process closes its keep-alive connections as it answers. SIGINT: fast shutdown.
struct Draining {
    gateway: Arc<Gateway>,
    drain: Duration,
}

#[async_trait]
impl ShutdownSignalWatch for Draining {
    async fn recv(&self) -> ShutdownSignal {
        let mut quit = signal(SignalKind::quit()).expect("SIGQUIT handler");
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = quit.recv() => {
                // Still ready (the new process shares the sockets); only keep-alive
                // connections close, so clients move to the new process.
                self.gateway.health.set_closing();
                log::info!("SIGQUIT: handing the listeners to the new process");
                ShutdownSignal::GracefulUpgrade
            }
            _ = term.recv() => {
                self.gateway.health.set_draining();
                log::info!(
                    "SIGTERM: /readyz reports draining; serving {:?} more before closing the listener",
                    self.drain
                );
                tokio::select! {
                    _ = tokio::time::sleep(self.drain) => {}
                    _ = term.recv() => {}
                    _ = int.recv() => return ShutdownSignal::FastShutdown,
                }
                ShutdownSignal::GracefulTerminate
            }
            _ = int.recv() => ShutdownSignal::FastShutdown,
        }
    }
}
