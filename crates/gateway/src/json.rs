//! JSON the gateway writes by hand on the request path (a refusal's body,
//! an access-log line), as `serde_json` writes it, without its escaping of
//! strings that need none: `serde_json` looks each byte up in its escape
//! table one at a time.

/// `s` as a JSON string. A string without a quote, a backslash or a
/// control character (a code, an id, a path, most messages) is copied as
/// it is; any other is escaped by `serde_json`.
pub(crate) fn string(out: &mut Vec<u8>, s: &str) {
    // Every byte looked at, without stopping at the first to escape: a loop
    // without an exit is done 16 bytes at a time, where `all` took about
    // 12 instructions a byte.
    let plain = !s.bytes().fold(false, |escape, b| {
        escape | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if plain {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Writing into a `Vec` cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// How many bytes [`string`] writes for the byte `b` of a string: what
/// `serde_json` makes of it (`\"`, `\n`, `\u001f`, or itself).
pub(crate) fn escaped_len(b: u8) -> usize {
    match b {
        b'"' | b'\\' | 0x08 | b'\t' | b'\n' | 0x0c | b'\r' => 2,
        ..0x20 => 6,
        _ => 1,
    }
}

/// `s` as a JSON string, or `null`.
pub(crate) fn string_or_null(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => string(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `string` writes is what `serde_json` writes, escapes included.
    #[test]
    fn strings_are_written_as_serde_json_writes_them() {
        for s in [
            "",
            "plain",
            "/a/b?c",
            "a \"quoted\" name",
            "a back\\slash",
            "tab\there, newline\n, nul\u{0}, escape\u{1b}, del\u{7f}",
            "é, ☃, \u{2028}, 𝄞",
        ] {
            let mut out = Vec::new();
            string(&mut out, s);
            assert_eq!(out, serde_json::to_vec(s).unwrap_or_default(), "{s:?}");
        }
        let mut out = Vec::new();
        string_or_null(&mut out, None);
        assert_eq!(out, b"null");
    }

    /// `escaped_len` counts what `serde_json` writes, byte by byte.
    #[test]
    fn each_byte_s_width_is_serde_json_s() {
        for b in 0u8..0x80 {
            let s = char::from(b).to_string();
            let written = serde_json::to_vec(&s).unwrap_or_default().len() - 2;
            assert_eq!(escaped_len(b), written, "{b:#04x}");
        }
        for s in ["é", "☃", "𝄞"] {
            assert!(s.bytes().all(|b| escaped_len(b) == 1));
        }
    }
}
