//! The command line: `-t` validates the whole file and names lines; `--version`.

mod common;

use common::check_config;

const GOOD: &str = "listen:\n  - addr: 127.0.0.1:18999\nupstream:\n  url: http://127.0.0.1:8090/fhir\nauth:\n  mode: insecure_dev\n";

#[test]
fn valid_config_passes_t() {
    let (code, out, err) = check_config(GOOD, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("configuration OK"), "{out}");
}

#[test]
fn broken_yaml_names_the_line() {
    let yaml = "listen:\n  - addr: 127.0.0.1:18999\nupstream:\n  url: http://127.0.0.1:8090/fhir\n   bad_indent: x\nauth:\n  mode: insecure_dev\n";
    let (code, _, err) = check_config(yaml, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(".yaml:5:"), "names line 5: {err}");
}

#[test]
fn unknown_key_is_rejected_with_its_line() {
    let yaml = GOOD.replace("auth:", "limits:\n  max_body: 10\nauth:");
    let (code, _, err) = check_config(&yaml, &[]);
    assert_eq!(code, 2);
    assert!(err.contains(".yaml:6:"), "{err}");
    assert!(err.contains("unknown field `max_body`"), "{err}");
}

#[test]
fn env_vars_are_expanded_and_missing_ones_named() {
    let yaml = GOOD.replace(
        "  url: http://127.0.0.1:8090/fhir\n",
        "  url: ${GW_TEST_UPSTREAM}\n  identity:\n    type: static_bearer\n    token: \"${GW_TEST_TOKEN}\"\n",
    );
    let (code, _, err) = check_config(
        &yaml,
        &[
            ("GW_TEST_UPSTREAM", "http://127.0.0.1:8090/fhir"),
            ("GW_TEST_TOKEN", "t0k"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = check_config(&yaml, &[("GW_TEST_UPSTREAM", "http://127.0.0.1:8090/fhir")]);
    assert_eq!(code, 2);
    assert!(
        err.contains(".yaml:7: environment variable GW_TEST_TOKEN is not set"),
        "{err}"
    );
}

#[test]
fn every_semantic_error_is_printed() {
    let yaml = "listen:\n  - addr: 0.0.0.0:18999\nupstream:\n  url: http://127.0.0.1:8090/fhir\n  timeouts:\n    read_ms: 0\nauth:\n  mode: insecure_dev\n";
    let (code, _, err) = check_config(yaml, &[]);
    assert_eq!(code, 2);
    assert!(err.contains(".yaml:6: upstream.timeouts.read_ms"), "{err}");
    assert!(
        err.contains(".yaml:8: auth.mode: insecure_dev refuses"),
        "{err}"
    );
    assert!(err.contains("2 error(s)"), "{err}");
}

#[test]
fn version_flag() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fhir-gateway"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let v = String::from_utf8_lossy(&out.stdout);
    assert!(
        v.starts_with(&format!("fhir-gateway {}", env!("CARGO_PKG_VERSION"))),
        "{v}"
    );
}

#[test]
fn unknown_modules_and_bad_settings_refuse_to_start_with_their_line() {
    let yaml = format!(
        "{GOOD}pre:\n  - name: TransformBundle\n  - name: NoSuchModule\npost:\n  - name: DateSort\n    settings:\n      max: 0\n  - name: TransformBundle\n"
    );
    let (code, _, err) = check_config(&yaml, &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains(".yaml:9: pre[1]: unknown pre-processor \"NoSuchModule\""),
        "{err}"
    );
    assert!(
        err.contains(".yaml:11: post[0]: DateSort: max must be"),
        "{err}"
    );
    assert!(
        err.contains(".yaml:14: post[1]: TransformBundle is a pre-processor"),
        "{err}"
    );
    // A misspelt setting is refused too.
    let yaml = format!("{GOOD}post:\n  - name: DateSort\n    settings: {{maxx: 10}}\n");
    let (code, _, err) = check_config(&yaml, &[]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown field `maxx`"), "{err}");
}

#[test]
fn routes_must_not_overlap_and_roles_must_exist() {
    let yaml = format!(
        "{GOOD}routes:\n  - prefix: /fhir/sub\n  - prefix: /research/fhir\n    policy:\n      read: [DataScientist, Auditor]\n"
    );
    let (code, _, err) = check_config(&yaml, &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("routes[0].prefix: \"/fhir/sub\" overlaps"),
        "{err}"
    );
    assert!(err.contains("unknown role \"Auditor\""), "{err}");
}
