use super::*;

fn env(name: &str) -> Option<String> {
    match name {
        "UPSTREAM_TOKEN" => Some("s3cr3t-token".into()),
        "PORT" => Some("8080".into()),
        "MULTILINE" => Some("a\nb".into()),
        _ => None,
    }
}

const MINIMAL: &str = "\
listen:
  - addr: 127.0.0.1:8080
upstream:
  url: http://127.0.0.1:8090/fhir/
auth:
  mode: insecure_dev
";

fn errors(text: &str) -> Vec<ConfigError> {
    match parse(text, &env) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(e) => e.0,
    }
}

#[test]
fn minimal_config_parses_with_defaults() {
    let c = parse(MINIMAL, &env).unwrap();
    assert_eq!(c.fhir_prefix, "/fhir");
    assert_eq!(c.limits.max_query_bytes, 16 * 1024);
    assert_eq!(c.upstream.timeouts.connect_ms, 2_000);
    assert_eq!(c.upstream.retries.max_attempts, 3);
    let sc = c.server_conf().unwrap();
    assert!(sc.threads >= 1);
    assert_eq!(sc.grace_period_seconds, Some(10));
    assert_eq!(sc.graceful_shutdown_timeout_seconds, Some(5));
    assert_eq!(sc.upstream_keepalive_pool_size, 128);
}

#[test]
fn pingora_section_is_passed_through() {
    let text = format!(
        "pingora:\n  threads: 3\n  grace_period_seconds: 20\n  pid_file: /run/x.pid\n{MINIMAL}"
    );
    let sc = parse(&text, &env).unwrap().server_conf().unwrap();
    assert_eq!(sc.threads, 3);
    assert_eq!(sc.grace_period_seconds, Some(20));
    assert_eq!(sc.pid_file, "/run/x.pid");
}

#[test]
fn unknown_key_is_an_error_with_its_line() {
    let text = "\
listen:
  - addr: 127.0.0.1:8080
upstream:
  url: http://127.0.0.1:8090/fhir
  timeouts:
    conect_ms: 10
auth:
  mode: insecure_dev
";
    let e = errors(text);
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].line, Some(6), "{e:?}");
    assert!(e[0].message.contains("unknown field `conect_ms`"), "{e:?}");
}

#[test]
fn broken_yaml_names_the_line() {
    let text = "listen:\n  - addr: 127.0.0.1:8080\nupstream:\n  url: [unclosed\nauth:\n  mode: insecure_dev\n";
    let e = errors(text);
    assert!(e[0].line.is_some(), "{e:?}");
    assert!(e[0].line.unwrap() >= 4, "{e:?}");
}

#[test]
fn yaml_line_breaks_other_than_lf_do_not_shift_the_named_line() {
    // Found by fuzz/regressions/config_load/: a lone CR made the error name line 2 of a
    // one-line file.
    let e = errors("\r{");
    assert_eq!(e[0].line, Some(1), "{e:?}");
    // A CR, a NEL and an LS inside a quoted scalar on the second line; the error is on the
    // third LF line.
    let text = "listen:\n  - addr: \"127.0.0.1:8080\rb\u{85}c\u{2028}d\"\nupstream: 5\n";
    let e = errors(text);
    assert_eq!(e[0].line, Some(3), "{e:?}");
    assert_eq!(newline_line("a\r\nb\r\nc", 3), 3, "CRLF is one break");
    assert_eq!(newline_line("a\rb\nc", 3), 2);
    assert_eq!(
        newline_line("a", 9),
        1,
        "past the end stays on the last line"
    );
}

#[test]
fn env_vars_are_expanded() {
    let text = MINIMAL.replace(
        "  url: http://127.0.0.1:8090/fhir/\n",
        "  url: http://127.0.0.1:8090/fhir/\n  identity:\n    type: static_bearer\n    token: \"${UPSTREAM_TOKEN}\"\n",
    );
    let c = parse(&text, &env).unwrap();
    match c.upstream.identity {
        IdentityConfig::StaticBearer { token } => assert_eq!(token, "s3cr3t-token"),
        other => panic!("{other:?}"),
    }
    let ports = MINIMAL.replace("127.0.0.1:8080", "127.0.0.1:${PORT}");
    assert_eq!(
        parse(&ports, &env).unwrap().listen[0].addr,
        "127.0.0.1:8080"
    );
}

#[test]
fn env_expansion_errors() {
    let e = expand_env("a: 1\nb: ${NOPE}\n", &env).unwrap_err();
    assert_eq!(e[0].line, Some(2));
    assert!(e[0].message.contains("NOPE is not set"));
    assert!(expand_env("b: ${MULTILINE}\n", &env).unwrap_err()[0]
        .message
        .contains("line break"));
    assert!(expand_env("b: ${bad-name}\n", &env).is_err());
    assert!(expand_env("b: ${OPEN\n", &env).is_err());
    // Escapes and comments.
    assert_eq!(
        expand_env("b: $${LITERAL}\n", &env).unwrap(),
        "b: ${LITERAL}\n"
    );
    assert_eq!(expand_env("# ${NOPE}\n", &env).unwrap(), "# ${NOPE}\n");
}

#[test]
fn insecure_dev_refuses_non_loopback() {
    let text = MINIMAL.replace("127.0.0.1:8080", "0.0.0.0:8080");
    let e = errors(&text);
    assert!(
        e.iter().any(|e| e.message.contains("insecure_dev refuses")),
        "{e:?}"
    );
    assert_eq!(e[0].line, Some(6));
}

#[test]
fn auth_is_required() {
    let text = MINIMAL.replace("auth:\n  mode: insecure_dev\n", "");
    let e = errors(&text);
    assert!(e[0].message.starts_with("auth: required"), "{e:?}");
}

#[test]
fn semantic_errors_are_all_reported_with_lines() {
    let text = "\
listen:
  - addr: 127.0.0.1:8080
  - addr: not-an-address
upstream:
  url: ftp://x
  timeouts:
    read_ms: 0
  identity:
    type: client_credentials
    token_url: http://127.0.0.1:9400/token
    client_id: c
    client_secret: s
  forward_headers: [Authorization]
auth:
  mode: insecure_dev
";
    let e = errors(text);
    let find = |s: &str| {
        e.iter()
            .find(|x| x.message.contains(s))
            .unwrap_or_else(|| panic!("no error with {s:?} in {e:?}"))
    };
    assert_eq!(find("listen[1].addr").line, Some(3));
    assert_eq!(find("upstream.url").line, Some(5));
    assert_eq!(find("read_ms").line, Some(7));
    assert_eq!(find("exactly one of scope").line, Some(8));
    assert_eq!(find("forward_headers[0]").line, Some(13));
}

#[test]
fn identity_variants() {
    let text = MINIMAL.replace(
        "  url: http://127.0.0.1:8090/fhir/\n",
        "  url: http://127.0.0.1:8090/fhir/\n  identity:\n    type: managed_identity\n    resource: https://x.azurehealthcareapis.com\n",
    );
    match parse(&text, &env).unwrap().upstream.identity {
        IdentityConfig::ManagedIdentity { imds_url, .. } => {
            assert!(imds_url.starts_with("http://169.254.169.254/"))
        }
        other => panic!("{other:?}"),
    }
    let bad = MINIMAL.replace(
        "  url: http://127.0.0.1:8090/fhir/\n",
        "  url: http://127.0.0.1:8090/fhir/\n  identity:\n    type: kerberos\n",
    );
    assert!(errors(&bad)[0].message.contains("unknown variant"));
    let extra = MINIMAL.replace(
        "  url: http://127.0.0.1:8090/fhir/\n",
        "  url: http://127.0.0.1:8090/fhir/\n  identity:\n    type: static_bearer\n    token: x\n    tokne: y\n",
    );
    assert!(errors(&extra)[0].message.contains("unknown field"));
}

#[test]
fn tls_verify_off_needs_insecure_dev() {
    // Only reachable with another auth mode; with insecure_dev it is accepted.
    let text = MINIMAL.replace(
        "  url: http://127.0.0.1:8090/fhir/\n",
        "  url: http://127.0.0.1:8090/fhir/\n  tls:\n    verify: false\n",
    );
    assert!(parse(&text, &env).is_ok());
}

#[test]
fn line_locator() {
    let text = "\
a:
  b: 1
  c:
    d: 2
list:
  - x: 1
    y: 2
  - x: 3
    # comment
    y: 4
";
    assert_eq!(line_of(text, &["a", "c", "d"]), Some(4));
    assert_eq!(line_of(text, &["list", "1", "y"]), Some(10));
    assert_eq!(line_of(text, &["list", "0", "y"]), Some(7));
    assert_eq!(line_of(text, &["a", "zz"]), Some(1));
    assert_eq!(line_of(text, &["nope"]), None);
}

const JWT: &str = "\
listen:
  - addr: 0.0.0.0:8443
upstream:
  url: https://fhir.example/fhir
auth:
  mode: jwt
  issuers:
    - name: entra
      issuer:
        - https://sts.windows.net/t1/
        - https://login.microsoftonline.com/t1/v2.0
      discovery_url: https://login.microsoftonline.com/t1/v2.0/.well-known/openid-configuration
      audiences: [api://fhir-gateway]
";

#[test]
fn jwt_config_parses_on_any_address() {
    let c = parse(JWT, &env).unwrap();
    let a = c.auth.unwrap();
    assert_eq!(a.mode, AuthMode::Jwt);
    assert_eq!(a.issuers[0].issuer.to_vec().len(), 2);
    assert_eq!(a.clock_skew_secs, 60);
    assert_eq!(a.issuers[0].claims.user_id, vec!["oid", "sub"]);
    assert_eq!(a.audit_headers.user_id, "X-MS-AZUREFHIR-AUDIT-USERID");
}

#[test]
fn auth_validation_fails_closed() {
    let cases: &[(&str, &str, &str)] = &[
        ("  issuers:\n", "  issuers: []\n  x_issuers:\n", "unknown field"),
        (
            "      discovery_url: https://login.microsoftonline.com/t1/v2.0/.well-known/openid-configuration\n",
            "      jwks_url: http://idp.internal/keys\n",
            "must come over https",
        ),
        (
            "      audiences: [api://fhir-gateway]\n",
            "      audiences: []\n",
            "at least one audience",
        ),
        (
            "      audiences: [api://fhir-gateway]\n",
            "      audiences: [api://fhir-gateway]\n      algorithms: [EdDSA]\n",
            "not supported",
        ),
        (
            "      audiences: [api://fhir-gateway]\n",
            "      audiences: [api://fhir-gateway]\n      algorithms: [HS256]\n",
            "need a shared_secret",
        ),
        (
            "  url: https://fhir.example/fhir\n",
            "  url: https://fhir.example/fhir\n  forward_headers: [X-MS-AZUREFHIR-AUDIT-Upn]\n",
            "audit prefix",
        ),
        (
            "  mode: jwt\n",
            "  mode: jwt\n  audit_headers:\n    upn: X-Caller-Upn\n",
            "",
        ),
    ];
    for (from, to, expect) in cases {
        let text = JWT.replace(from, to);
        assert_ne!(text, JWT, "replacement {from:?} did not apply");
        match (parse(&text, &env), expect.is_empty()) {
            (Ok(_), true) => {}
            (Err(e), false) => assert!(
                e.0.iter().any(|x| x.message.contains(expect)),
                "{expect:?} not in {e}"
            ),
            (Ok(_), false) => panic!("accepted, expected {expect:?}:\n{text}"),
            (Err(e), true) => panic!("rejected: {e}\n{text}"),
        }
    }
    // A renamed audit header may not be forwarded from the client either.
    let renamed = JWT
        .replace(
            "  mode: jwt\n",
            "  mode: jwt\n  audit_headers:\n    upn: X-Caller-Upn\n",
        )
        .replace(
            "  url: https://fhir.example/fhir\n",
            "  url: https://fhir.example/fhir\n  forward_headers: [x-caller-upn]\n",
        );
    assert!(errors(&renamed)
        .iter()
        .any(|e| e.message.contains("audit or offload-proof")));
    // jwt without issuers.
    let none = JWT.split("  issuers:").next().unwrap().to_string();
    assert!(errors(&none)
        .iter()
        .any(|e| e.message.contains("at least one trusted issuer")));
    // Issuers are meaningless without jwt.
    let dev = JWT
        .replace("mode: jwt", "mode: insecure_dev")
        .replace("0.0.0.0", "127.0.0.1");
    assert!(errors(&dev)
        .iter()
        .any(|e| e.message.contains("only used with mode jwt")));
    // Client secrets travel over https only.
    let cc = MINIMAL.replace(
        "  url: http://127.0.0.1:8090/fhir/\n",
        "  url: http://127.0.0.1:8090/fhir/\n  identity:\n    type: client_credentials\n    token_url: http://login.example/token\n    client_id: a\n    client_secret: b\n    scope: x\n",
    );
    assert!(errors(&cc).iter().any(|e| e.message.contains("over https")));
}

#[test]
fn misspelt_pingora_keys_and_zero_keepalive_are_refused() {
    let text = format!("pingora:\n  grace_period_secs: 20\n{MINIMAL}");
    let e = errors(&text);
    assert!(
        e.iter()
            .any(|x| x.message.contains("unknown key \"grace_period_secs\"") && x.line == Some(2)),
        "{e:?}"
    );
    let text = format!("{MINIMAL}limits:\n  downstream_keepalive_secs: 0\n");
    assert!(errors(&text)
        .iter()
        .any(|x| x.message.contains("downstream_keepalive_secs")));
}

#[test]
fn participant_roles_need_the_participant_filter() {
    let granted = format!("{MINIMAL}policy:\n  read: [Reader, Patient]\n");
    let e = errors(&granted);
    assert!(
        e.iter()
            .any(|e| e.message.contains("no ParticipantFilter") && e.line == Some(7)),
        "{e:?}"
    );
    let filtered = format!("{granted}post:\n  - name: ParticipantFilter\n");
    assert!(parse(&filtered, &env).is_ok());
    // On another route too.
    let route = format!(
        "{MINIMAL}routes:\n  - prefix: /portal/fhir\n    policy:\n      read: [Practitioner]\n"
    );
    assert!(errors(&route).iter().any(|e| e
        .message
        .contains("routes[0].policy grants the participant role")));
}

#[test]
fn identity_links_are_checked() {
    let c = parse(MINIMAL, &env).unwrap();
    assert_eq!(c.identity_links.system, "urn:fhir-gateway:identity-link");
    let bad = format!("{MINIMAL}identity_links:\n  system: \"a|b\"\n");
    assert!(errors(&bad)
        .iter()
        .any(|e| e.message.contains("identity_links.system") && e.line == Some(8)));
    let unknown = format!("{MINIMAL}identity_links:\n  ttl: 5\n");
    assert!(!errors(&unknown).is_empty());
}

#[test]
fn events_settings_are_checked() {
    let c = parse(MINIMAL, &env).unwrap();
    assert!(c.events.kafka.is_none());
    assert_eq!(c.events.file, "events.jsonl");
    assert_eq!(
        c.events.spool.fsync().unwrap(),
        crate::events::spool::Fsync::EveryMs(100)
    );
    let ok = format!(
        "{MINIMAL}events:\n  kafka:\n    bootstrap_servers: ns.servicebus.windows.net:9093\n    topic: fhir\n    connection_string: ${{UPSTREAM_TOKEN}}\n    properties: {{client.id: gw}}\n  spool: {{fsync: always}}\n"
    );
    let c = parse(&ok, &env).unwrap();
    let k = c.events.kafka.unwrap();
    assert_eq!(k.connection_string.as_deref(), Some("s3cr3t-token"));
    assert!(k.invalidate_caches);
    let bad = format!("{MINIMAL}events:\n  queue_capacity: 0\n  spool:\n    fsync: sometimes\n");
    let e = errors(&bad);
    assert!(
        e.iter().any(|e| e.message.contains("queue_capacity")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|e| e.message.contains("events.spool.fsync") && e.line == Some(10)),
        "{e:?}"
    );
    let no_topic =
        format!("{MINIMAL}events:\n  kafka:\n    bootstrap_servers: x:9092\n    topic: \"\"\n");
    assert!(errors(&no_topic)
        .iter()
        .any(|e| e.message.contains("topic")));
}

#[test]
fn bulk_defaults_to_administrators_and_a_random_key() {
    let c = parse(MINIMAL, &env).unwrap();
    assert_eq!(c.bulk.export_roles, vec!["Administrator".to_string()]);
    assert_eq!(
        c.built.bulk.export_roles,
        vec![fhir_gateway_modules::Role::Administrator]
    );
    assert!(c.built.bulk.key.is_none());
    assert_eq!(c.bulk.url_lifetime_secs, 86_400);
}

#[test]
fn bulk_key_file_is_checked_before_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("fgw-bulk-key-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, key: &[u8], mode: u32| {
        let p = dir.join(name);
        std::fs::write(&p, key).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p.display().to_string()
    };
    let conf = |file: &str| format!("{MINIMAL}bulk:\n  binding_key_file: {file}\n");
    let good = write("good", b"0123456789abcdef0123456789abcdef\n", 0o600);
    let c = parse(&conf(&good), &env).unwrap();
    assert!(c.built.bulk.key.is_some());

    let short = write("short", b"0123456789abcdef0123456789abcde\n", 0o600);
    let e = errors(&conf(&short));
    assert!(e[0].message.contains("at least 32 are needed"), "{e:?}");
    assert_eq!(e[0].line, Some(8));

    let open = write("open", b"0123456789abcdef0123456789abcdef", 0o644);
    let e = errors(&conf(&open));
    assert!(e[0].message.contains("chmod 600"), "{e:?}");

    let e = errors(&conf(&dir.join("missing").display().to_string()));
    assert!(e[0].message.starts_with("bulk.binding_key_file:"), "{e:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bulk_roles_and_lifetime_are_checked() {
    let e = errors(&format!(
        "{MINIMAL}bulk:\n  export_roles: [Administrator, Exporter]\n  url_lifetime_secs: 10\n"
    ));
    let msgs: Vec<&str> = e.iter().map(|e| e.message.as_str()).collect();
    assert!(
        msgs.contains(&"bulk.export_roles: unknown role \"Exporter\""),
        "{msgs:?}"
    );
    assert!(
        msgs.iter().any(|m| m.starts_with("bulk.url_lifetime_secs")),
        "{msgs:?}"
    );
    // An empty list turns exports off: allowed, and nobody may export.
    let c = parse(&format!("{MINIMAL}bulk:\n  export_roles: []\n"), &env).unwrap();
    assert!(c.built.bulk.export_roles.is_empty());
    let e = errors(&format!("{MINIMAL}bulk:\n  binding_key: x\n"));
    assert!(e[0].message.contains("unknown field"), "{e:?}");
}

#[test]
fn audit_and_break_the_glass_are_checked_before_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("fgw-audit-key-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("k");
    std::fs::write(&key, "0123456789abcdef0123456789abcdef").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let audit = format!(
        "audit:\n  file: {}\n  key_file: {}\n",
        dir.join("trail.jsonl").display(),
        key.display()
    );
    let c = parse(&format!("{MINIMAL}{audit}"), &env).unwrap();
    assert_eq!(c.built.audit.key.len(), 32);
    assert_eq!(c.audit.as_ref().unwrap().checkpoint_every, 1000);

    let msgs =
        |text: String| -> Vec<String> { errors(&text).into_iter().map(|e| e.message).collect() };
    let m = msgs(format!(
        "{MINIMAL}audit:\n  file: relative.jsonl\n  key_file: /nonexistent/key\n  instance: 'a b'\n"
    ));
    assert!(m.iter().any(|x| x.starts_with("audit.key_file:")), "{m:?}");
    assert!(
        m.iter()
            .any(|x| x.starts_with("audit.file: must be an absolute")),
        "{m:?}"
    );
    assert!(m.iter().any(|x| x.starts_with("audit.instance")), "{m:?}");
    // Break-the-glass is never unaudited.
    let m = msgs(format!(
        "{MINIMAL}break_the_glass:\n  roles: [Practitioner]\n"
    ));
    assert!(
        m.iter().any(|x| x.contains("needs the audit trail")),
        "{m:?}"
    );
    let m = msgs(format!(
        "{MINIMAL}{audit}break_the_glass:\n  roles: [Doctor]\n  minutes: 0\n"
    ));
    assert!(
        m.iter().any(|x| x.contains("unknown role \"Doctor\"")),
        "{m:?}"
    );
    assert!(
        m.iter().any(|x| x.starts_with("break_the_glass.minutes")),
        "{m:?}"
    );
    let c = parse(
        &format!("{MINIMAL}{audit}break_the_glass:\n  roles: [Practitioner]\n"),
        &env,
    )
    .unwrap();
    assert_eq!(
        c.built.glass.roles,
        vec![fhir_gateway_modules::Role::Practitioner]
    );
    let _ = std::fs::remove_dir_all(dir);
}
