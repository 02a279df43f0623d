//! From a file to a validated `GatewayConfig`: read, expand `${ENV}`, parse, validate; and the
//! errors, each with the line of the file it concerns (YAML errors carry serde's; validation
//! errors are located by key path, `locate.rs`).

use super::GatewayConfig;
use fhir_gateway_modules::builtin::Registry;
use std::fmt;
use std::path::Path;

/// One problem in the configuration, with the YAML line it concerns when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "line {l}: {}", self.message),
            None => write!(f, "{}", self.message),
        }
    }
}

/// Every problem found, so `-t` can print them all at once.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads, expands, parses and validates a configuration file; `registry` knows the modules
/// its chains may name.
pub fn load(path: &Path, registry: &Registry) -> Result<GatewayConfig, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            line: None,
            message: format!("cannot read {}: {e}", path.display()),
        }])
    })?;
    parse_with(&text, &|name| std::env::var(name).ok(), registry)
}

/// Parses configuration text with the built-in modules; `env` resolves `${NAME}` references.
pub fn parse(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<GatewayConfig, ConfigErrors> {
    parse_with(text, env, &Registry::builtin())
}

/// Parses configuration text whose chains may name the modules of `registry`.
pub fn parse_with(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
    registry: &Registry,
) -> Result<GatewayConfig, ConfigErrors> {
    let expanded = expand_env(text, env).map_err(ConfigErrors)?;
    let mut cfg: GatewayConfig = serde_yaml::from_str(&expanded).map_err(|e| {
        let line = e.location().map(|l| newline_line(&expanded, l.line()));
        ConfigErrors(vec![ConfigError {
            line,
            message: e.to_string(),
        }])
    })?;
    cfg.built = super::validate(&cfg, text, registry).map_err(ConfigErrors)?;
    Ok(cfg)
}

/// YAML also breaks lines at a lone CR, NEL, LS and PS, but editors (and `-t`'s `file:line`)
/// count only LF: maps YAML line `yaml_line` of `text` to the LF-counted line it starts on, so an
/// error never names a line past the end of the file.
pub(super) fn newline_line(text: &str, yaml_line: usize) -> usize {
    let (mut yaml, mut lf) = (1, 1);
    let mut chars = text.chars().peekable();
    while yaml < yaml_line {
        match chars.next() {
            None => break,
            Some('\n') => lf += 1,
            Some('\r') if chars.peek() == Some(&'\n') => {
                chars.next();
                lf += 1;
            }
            Some('\r' | '\u{85}' | '\u{2028}' | '\u{2029}') => {}
            Some(_) => continue,
        }
        yaml += 1;
    }
    lf
}

/// Replaces `${NAME}` with the environment's value, line by line so line numbers stay true.
/// `$${` writes a literal `${`. Comment lines are left alone. A value with a line break is
/// refused: it would change the YAML structure around it.
pub fn expand_env(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, Vec<ConfigError>> {
    let mut out = String::with_capacity(text.len());
    let mut errors = Vec::new();
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let lineno = i + 1;
        if line.trim_start().starts_with('#') || !line.contains("${") {
            out.push_str(line);
            continue;
        }
        let mut rest = line;
        while let Some(pos) = rest.find("${") {
            if pos > 0 && rest.as_bytes()[pos - 1] == b'$' {
                out.push_str(&rest[..pos - 1]);
                out.push_str("${");
                rest = &rest[pos + 2..];
                continue;
            }
            out.push_str(&rest[..pos]);
            let after = &rest[pos + 2..];
            let Some(end) = after.find('}') else {
                errors.push(ConfigError {
                    line: Some(lineno),
                    message: "unterminated ${...} reference".into(),
                });
                rest = "";
                break;
            };
            let name = &after[..end];
            let valid =
                !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            match (valid, env(name)) {
                (false, _) => errors.push(ConfigError {
                    line: Some(lineno),
                    message: format!("invalid environment variable name {name:?}"),
                }),
                (true, None) => errors.push(ConfigError {
                    line: Some(lineno),
                    message: format!("environment variable {name} is not set"),
                }),
                (true, Some(v)) if v.contains(['\n', '\r']) => errors.push(ConfigError {
                    line: Some(lineno),
                    message: format!("environment variable {name} contains a line break"),
                }),
                (true, Some(v)) => out.push_str(&v),
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}
