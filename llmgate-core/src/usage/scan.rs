//! Just enough JSON scanning to find an object's members by their byte positions.
//!
//! The usage readers edit and read bytes that go to a client: an upstream's number
//! `-1.9361265e-07`, its escape `\u00e9` and its spacing must reach the client as they
//! were sent, which a parse into `serde_json::Value` and back does not keep. So the
//! readers locate members here and parse only the small values they need (a `usage`
//! object, a `model` string) with serde.
//!
//! The scanner does not validate: on bytes that are not JSON it stops or finds
//! nothing, and callers validate with serde before they change anything.

use std::ops::Range;

/// One member of an object: where its name (without quotes) and its value lie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Member {
    /// The name's bytes between its quotes, escapes as written.
    pub name: Range<usize>,
    /// The value, from its first byte to its last.
    pub value: Range<usize>,
}

/// The index of the first byte at or after `at` that is not JSON whitespace.
pub(crate) fn skip_ws(bytes: &[u8], mut at: usize) -> usize {
    while matches!(bytes.get(at), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        at += 1;
    }
    at
}

/// The index just past the string that opens at `at` (a `"`); `None` if it never ends.
pub(crate) fn string_end(bytes: &[u8], at: usize) -> Option<usize> {
    let mut i = at + 1;
    loop {
        i += memchr::memchr2(b'"', b'\\', bytes.get(i..)?)?;
        if bytes[i] == b'"' {
            return Some(i + 1);
        }
        i += 2; // the backslash and the character it escapes
    }
}

/// The index just past the value that starts at `at`; `None` if it is cut off.
pub(crate) fn value_end(bytes: &[u8], at: usize) -> Option<usize> {
    match *bytes.get(at)? {
        b'"' => string_end(bytes, at),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = at;
            loop {
                match *bytes.get(i)? {
                    b'"' => {
                        i = string_end(bytes, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        _ => {
            // A number, `true`, `false` or `null`: up to the next delimiter.
            let len = bytes[at..]
                .iter()
                .position(|b| matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
                .unwrap_or(bytes.len() - at);
            (len > 0 && at + len < bytes.len()).then_some(at + len)
        }
    }
}

/// The members of the object whose `{` is at `open`, in order. Stops at the first
/// thing that is not a member (a cut-off or malformed object yields what came before).
pub(crate) fn members(bytes: &[u8], open: usize) -> Members<'_> {
    let at = if bytes.get(open) == Some(&b'{') {
        skip_ws(bytes, open + 1)
    } else {
        bytes.len()
    };
    Members { bytes, at }
}

/// Iterator returned by [`members`].
#[derive(Debug)]
pub(crate) struct Members<'a> {
    bytes: &'a [u8],
    /// Where the next member's name should start; past the end once done.
    at: usize,
}

impl Iterator for Members<'_> {
    type Item = Member;

    fn next(&mut self) -> Option<Member> {
        let bytes = self.bytes;
        let member = (|| {
            if bytes.get(self.at) != Some(&b'"') {
                return None;
            }
            let name_end = string_end(bytes, self.at)?;
            let colon = skip_ws(bytes, name_end);
            if bytes.get(colon) != Some(&b':') {
                return None;
            }
            let start = skip_ws(bytes, colon + 1);
            let end = value_end(bytes, start)?;
            let next = skip_ws(bytes, end);
            let member = Member {
                name: self.at + 1..name_end - 1,
                value: start..end,
            };
            self.at = match bytes.get(next) {
                Some(b',') => skip_ws(bytes, next + 1),
                _ => usize::MAX, // `}` or garbage: no member follows
            };
            Some(member)
        })();
        if member.is_none() {
            self.at = usize::MAX;
        }
        member
    }
}

/// The last member named `name` of the object at `open` (JSON parsers keep the last of
/// duplicated names).
pub(crate) fn find_member(bytes: &[u8], open: usize, name: &[u8]) -> Option<Member> {
    members(bytes, open)
        .filter(|m| &bytes[m.name.clone()] == name)
        .last()
}

/// The byte range to cut so that `member`, one of `all` (the object's members in
/// order), is gone with exactly one of the commas around it: from its name to the next
/// member's name, or, for the last member, from the end of the previous value.
pub(crate) fn removal(all: &[Member], index: usize) -> Range<usize> {
    let member = &all[index];
    let name_start = member.name.start - 1;
    match (all.get(index + 1), index.checked_sub(1).map(|i| &all[i])) {
        (Some(next), _) => name_start..next.name.start - 1,
        (None, Some(previous)) => previous.value.end..member.value.end,
        (None, None) => name_start..member.value.end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(json: &str) -> Vec<(&str, &str)> {
        members(json.as_bytes(), 0)
            .map(|m| (&json[m.name], &json[m.value]))
            .collect()
    }

    #[test]
    fn finds_members_whatever_the_spacing_and_nesting() {
        let json =
            r#"{ "a" : 1 , "b\"{":{"usage":[1,{"x":"]}"}]},"c":-1.5e-07,"d":"\u00e9","e":null }"#;
        assert_eq!(
            names(json),
            vec![
                ("a", "1"),
                ("b\\\"{", r#"{"usage":[1,{"x":"]}"}]}"#),
                ("c", "-1.5e-07"),
                ("d", r#""\u00e9""#),
                ("e", "null"),
            ]
        );
        assert_eq!(names("{}"), vec![]);
        assert_eq!(names("[1]"), vec![]);
    }

    #[test]
    fn a_cut_off_object_yields_the_members_before_the_cut() {
        assert_eq!(names(r#"{"a":1,"b":{"c":"#), vec![("a", "1")]);
        assert_eq!(names(r#"{"a":"x"#), vec![]);
        assert_eq!(names(r#"{"a":12"#), vec![], "a number may go on");
    }

    #[test]
    fn removal_takes_one_comma_with_the_member() {
        let cut = |json: &str, name: &str| {
            let all: Vec<_> = members(json.as_bytes(), 0).collect();
            let i = all
                .iter()
                .position(|m| &json[m.name.clone()] == name)
                .unwrap();
            let range = removal(&all, i);
            format!("{}{}", &json[..range.start], &json[range.end..])
        };
        assert_eq!(
            cut(r#"{"a":1, "usage": null ,"b":2}"#, "usage"),
            r#"{"a":1, "b":2}"#
        );
        assert_eq!(cut(r#"{"usage":null, "b":2}"#, "usage"), r#"{"b":2}"#);
        assert_eq!(cut(r#"{"a":1 , "usage":null }"#, "usage"), r#"{"a":1 }"#);
        assert_eq!(cut(r#"{ "usage":null }"#, "usage"), r#"{  }"#);
    }
}
