//! Configuration loading (`src/config/mod.rs`): what `fhir-gateway -t` runs on a file, minus
//! anything that leaves the process. `config::load` is `read_to_string` + `config::parse`
//! (`${NAME}` expansion, YAML, validation); `main.rs` then builds `Gateway::new` and
//! `server_conf()` before it prints "configuration OK".
//!
//! Here: `config::parse` on the text with a fixed environment, then `server_conf()`, then
//! `Gateway::new` when that cannot reach the network or read odd files: the upstream host is
//! an IP literal or `localhost` (no DNS) and no CA file is named. Not run:
//! `events::check` (it creates a Kafka client, which connects to the brokers).
//!
//! Invariant: never panics (nor aborts) on any text; every problem comes back as a value,
//! with a message, and with a line number inside the text when there is one.
//!
//! Regression: fuzz/regressions/config_load/ (a lone CR is a line break to YAML but not to an
//! editor: a YAML error named a line past the end of the file; fixed, errors count LF lines).
#![no_main]

use fhir_gateway::config;
use fhir_gateway::upstream::BaseUrl;
use fhir_gateway::Gateway;
use libfuzzer_sys::fuzz_target;

fn env(name: &str) -> Option<String> {
    Some(
        match name {
            "FHIR_UPSTREAM_URL" => "http://127.0.0.1:8090/fhir",
            "FHIR_GATEWAY_PUBLIC_BASE_URL" => "https://fhir.example.org/fhir",
            "FHIR_GATEWAY_TENANT_ID" => "00000000-0000-0000-0000-000000000000",
            "FHIR_GATEWAY_CLIENT_SECRET" => "s3cr3t-s3cr3t-s3cr3t",
            "EMPTY" => "",
            "TWO_LINES" => "a\nb",
            _ => return None,
        }
        .to_string(),
    )
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let lines = text.split_inclusive('\n').count().max(1);
    let cfg = match config::parse(&text, &env) {
        Ok(c) => c,
        Err(errors) => {
            assert!(!errors.0.is_empty(), "an error list without an error");
            for e in &errors.0 {
                assert!(!e.message.is_empty());
                if let Some(l) = e.line {
                    assert!(
                        l >= 1 && l <= lines + 1,
                        "line {l} of {lines}: {}",
                        e.message
                    );
                }
            }
            let _ = errors.to_string();
            return;
        }
    };
    let _ = cfg.server_conf();
    let Ok(base) = BaseUrl::parse(&cfg.upstream.url) else {
        panic!(
            "validated upstream.url {:?} does not parse",
            cfg.upstream.url
        );
    };
    let host = base.host.trim_matches(['[', ']']);
    let local = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok();
    if local && cfg.upstream.tls.ca_file.is_none() {
        if let Err(e) = Gateway::new(&cfg) {
            assert!(!e.is_empty());
        }
    }
});
