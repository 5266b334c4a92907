//! Reading the API key a request presents from its headers.

use http::HeaderMap;

use super::Secret;

/// The key a request presents: `Authorization: Bearer <key>`, `api-key: <key>` (Azure
/// OpenAI's header) or `x-api-key: <key>`, in that order.
pub fn key_from_headers(headers: &HeaderMap) -> Option<Secret> {
    presented_key(headers).map(Secret::new)
}

/// The key text a request presents (see [`key_from_headers`]), borrowed from its headers.
pub(crate) fn presented_key(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| bearer_token(v.as_bytes()));
    let plain = |name: &str| {
        headers
            .get(name)
            .and_then(|v| ascii(v.as_bytes().trim_ascii()))
    };
    bearer
        .or_else(|| plain("api-key"))
        .or_else(|| plain("x-api-key"))
        .filter(|key| !key.is_empty())
}

/// The token of an `Authorization: Bearer <token>` value (the scheme in any case, spaces
/// around the token ignored); `None` for any other scheme. Read as bytes: this runs on
/// every request.
fn bearer_token(value: &[u8]) -> Option<&str> {
    let (scheme, rest) = value.trim_ascii_start().split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || rest.first() != Some(&b' ') {
        return None;
    }
    ascii(rest.trim_ascii())
}

/// The text of header bytes that are all ASCII (a key never has other bytes).
fn ascii(bytes: &[u8]) -> Option<&str> {
    if bytes.is_ascii() {
        std::str::from_utf8(bytes).ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_static(k),
                    HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    #[test]
    fn reads_all_three_header_forms() {
        let expect = Some(Secret::new("sk-lg-abc"));
        assert_eq!(
            key_from_headers(&headers(&[("authorization", "Bearer sk-lg-abc")])),
            expect
        );
        assert_eq!(
            key_from_headers(&headers(&[("authorization", "bearer  sk-lg-abc ")])),
            expect
        );
        assert_eq!(
            key_from_headers(&headers(&[("api-key", "sk-lg-abc")])),
            expect
        );
        assert_eq!(
            key_from_headers(&headers(&[("x-api-key", "sk-lg-abc")])),
            expect
        );
    }

    #[test]
    fn ignores_other_schemes_and_empty_values() {
        assert_eq!(
            key_from_headers(&headers(&[("authorization", "Basic dXNlcjpwYXNz")])),
            None
        );
        assert_eq!(
            key_from_headers(&headers(&[("authorization", "Bearer ")])),
            None
        );
        assert_eq!(key_from_headers(&headers(&[("api-key", "")])), None);
        assert_eq!(
            key_from_headers(&headers(&[("authorization", "Bearersk-lg-abc")])),
            None
        );
        assert_eq!(
            key_from_headers(&headers(&[("authorization", "Bearer\tsk-lg-abc")])),
            None
        );
        // Another scheme falls through to the other headers.
        assert_eq!(
            key_from_headers(&headers(&[
                ("authorization", "Basic dXNlcjpwYXNz"),
                ("x-api-key", " sk-lg-abc ")
            ])),
            Some(Secret::new("sk-lg-abc"))
        );
        assert_eq!(key_from_headers(&HeaderMap::new()), None);
    }
}
