//! What `flotilla up` prints: instance output prefixed with the instance id,
//! and the runtime's own events. JSON log lines (the runtime contract asks
//! services for them) are shown compactly; anything else is shown as is.

use std::io::Write;

/// Prints to stdout when enabled; always cheap to call.
#[derive(Debug)]
pub(crate) struct Console {
    /// Instances' output (`flotilla up --quiet` turns it off).
    echo: bool,
    /// The runtime's own events and warnings: on for `flotilla up`, quiet
    /// or not (a refused reload or a crash loop must not go unseen because
    /// the services' output is), off for a system a test runs.
    events: bool,
}

impl Console {
    pub(crate) fn new(echo: bool, events: bool) -> Self {
        Console { echo, events }
    }

    /// One line of an instance's output.
    pub(crate) fn instance_line(&self, instance: &str, line: &str) {
        if !self.echo {
            return;
        }
        let shown = compact_json(line).unwrap_or_else(|| line.to_string());
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{instance:>12} | {shown}");
    }

    /// An event of the runtime itself (start, crash, restart, scale).
    pub(crate) fn event(&self, message: &str) {
        tracing::info!(target: "flotilla::runtime", "{message}");
        if self.events {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{:>12} | {message}", "flotilla");
        }
    }

    /// A problem the operator should see even when output is quiet.
    pub(crate) fn warn(&self, message: &str) {
        tracing::warn!(target: "flotilla::runtime", "{message}");
        if self.events {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{:>12} | warning: {message}", "flotilla");
        }
    }
}

/// `LEVEL message key=value …` for a tracing-style JSON line.
fn compact_json(line: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
    let obj = value.as_object()?;
    let level = obj.get("level")?.as_str()?;
    let fields = obj.get("fields").and_then(|f| f.as_object());
    let message = fields
        .and_then(|f| f.get("message"))
        .or_else(|| obj.get("message"))
        .or_else(|| obj.get("msg"))
        .and_then(|m| m.as_str())
        .unwrap_or("");
    let mut out = format!("{level:<5} {message}");
    if let Some(fields) = fields {
        for (k, v) in fields {
            if k == "message" {
                continue;
            }
            match v.as_str() {
                Some(s) => out.push_str(&format!(" {k}={s}")),
                None => out.push_str(&format!(" {k}={v}")),
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_are_compacted() {
        let line = r#"{"timestamp":"t","level":"INFO","fields":{"message":"listening","addr":"127.0.0.1:1"},"target":"x"}"#;
        assert_eq!(
            compact_json(line).unwrap(),
            "INFO  listening addr=127.0.0.1:1"
        );
        assert!(compact_json("plain text").is_none());
    }
}
