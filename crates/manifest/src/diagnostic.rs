//! Diagnostics that point at the exact place in `flotilla.toml` and say what
//! to write instead, rendered like a compiler error so a user can fix the
//! file without reading our docs.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem in a manifest, with its location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The manifest file.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// What is wrong.
    pub message: String,
    /// What to write instead, when we can tell.
    pub help: Option<String>,
    /// The offending source line and the width of the span on it, for display.
    snippet: Option<(String, usize)>,
}

impl Diagnostic {
    /// Builds a diagnostic for the byte range `span` of `source`.
    pub(crate) fn at(
        file: &Path,
        source: &str,
        span: Option<Range<usize>>,
        message: impl Into<String>,
        help: Option<String>,
    ) -> Self {
        let span = span.unwrap_or(0..0);
        let start = span.start.min(source.len());
        let before = &source[..start];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = source[line_start..start].chars().count() + 1;
        let line_end = source[line_start..]
            .find('\n')
            .map_or(source.len(), |i| line_start + i);
        let text = source[line_start..line_end]
            .trim_end_matches('\r')
            .to_string();
        let end = span.end.clamp(start, line_end);
        let width = source[start..end].chars().count().max(1);
        Diagnostic {
            file: file.to_path_buf(),
            line,
            column,
            message: message.into(),
            help,
            snippet: (!source.is_empty()).then_some((text, width)),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "error: {}", self.message)?;
        write!(
            f,
            "  --> {}:{}:{}",
            self.file.display(),
            self.line,
            self.column
        )?;
        if let Some((text, width)) = &self.snippet {
            let gutter = self.line.to_string().len();
            write!(
                f,
                "\n{:gutter$} |\n{} | {}\n{:gutter$} | {:pad$}{}",
                "",
                self.line,
                text,
                "",
                "",
                "^".repeat(*width),
                pad = self.column - 1,
            )?;
        }
        if let Some(help) = &self.help {
            write!(f, "\n  = help: {help}")?;
        }
        Ok(())
    }
}

/// The candidate closest to `word` by edit distance, if it is close enough
/// to be a plausible typo.
pub(crate) fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (levenshtein(word, c), c))
        .filter(|(d, c)| *d <= (c.len().max(word.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_and_snippet() {
        let src = "name = \"x\"\n[services.a]\nreplica = 2\n";
        let start = src.find("replica").unwrap();
        let d = Diagnostic::at(
            Path::new("flotilla.toml"),
            src,
            Some(start..start + 7),
            "unknown key `replica`",
            Some("did you mean `replicas`?".into()),
        );
        assert_eq!((d.line, d.column), (3, 1));
        let shown = d.to_string();
        assert!(shown.contains("--> flotilla.toml:3:1"), "{shown}");
        assert!(shown.contains("3 | replica = 2"), "{shown}");
        assert!(shown.contains("  | ^^^^^^^"), "{shown}");
        assert!(shown.contains("help: did you mean `replicas`?"), "{shown}");
    }

    #[test]
    fn suggestions() {
        assert_eq!(
            did_you_mean("replica", ["shape", "replicas", "run"]),
            Some("replicas")
        );
        assert_eq!(did_you_mean("zzz", ["shape", "replicas"]), None);
        assert_eq!(
            did_you_mean("fucntion", ["service", "function"]),
            Some("function")
        );
    }
}
