//! The endpoint a request path is counted under: one of OpenAI's (and llmgate's own)
//! endpoints, or `other`. Metrics labels and per-endpoint totals use it, so made-up
//! paths cannot grow them without bound.

/// The label for paths that are not a known endpoint.
pub const OTHER_ENDPOINT: &str = "other";

/// Endpoints counted under their own path. A `{id}` segment stands for any one segment.
const KNOWN: &[&str] = &[
    "/v1/chat/completions",
    "/v1/chat/completions/{id}",
    "/v1/chat/completions/{id}/messages",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/responses/{id}",
    "/v1/responses/{id}/cancel",
    "/v1/responses/{id}/input_items",
    "/v1/responses/input_tokens",
    "/v1/conversations",
    "/v1/conversations/{id}",
    "/v1/conversations/{id}/items",
    "/v1/models",
    "/v1/models/{id}",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/v1/audio/speech",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/images/variations",
    "/v1/moderations",
    "/v1/rerank",
    "/v1/files",
    "/v1/files/{id}",
    "/v1/files/{id}/content",
    "/v1/uploads",
    "/v1/batches",
    "/v1/batches/{id}",
    "/v1/batches/{id}/cancel",
    "/v1/me/usage",
];

/// The endpoint `path` (without its query) is counted under: a known endpoint's
/// pattern, or [`OTHER_ENDPOINT`].
pub fn endpoint_label(path: &str) -> &'static str {
    let path = path
        .strip_suffix('/')
        .filter(|p| !p.is_empty())
        .unwrap_or(path);
    // Nearly every request names an endpoint exactly: compared whole (most patterns are
    // ruled out by their length), nothing split. This runs for every record, several
    // times (metrics, totals).
    if let Some(known) = KNOWN.iter().find(|pattern| **pattern == path) {
        return known;
    }
    KNOWN
        .iter()
        .filter(|pattern| pattern.contains('{'))
        .find(|pattern| matches(pattern, path))
        .copied()
        .unwrap_or(OTHER_ENDPOINT)
}

fn matches(pattern: &str, path: &str) -> bool {
    let mut want = pattern.split('/');
    let mut got = path.split('/');
    loop {
        match (want.next(), got.next()) {
            (None, None) => return true,
            (Some("{id}"), Some(segment)) if !segment.is_empty() => {}
            (Some(w), Some(g)) if w == g => {}
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_endpoints_keep_their_path_and_ids_are_folded() {
        assert_eq!(
            endpoint_label("/v1/chat/completions"),
            "/v1/chat/completions"
        );
        assert_eq!(
            endpoint_label("/v1/chat/completions/"),
            "/v1/chat/completions"
        );
        assert_eq!(endpoint_label("/v1/models/gemma-3"), "/v1/models/{id}");
        assert_eq!(endpoint_label("/v1/models/"), "/v1/models");
        assert_eq!(endpoint_label("/v1/responses/resp_1"), "/v1/responses/{id}");
        assert_eq!(endpoint_label("/v1/me/usage"), "/v1/me/usage");
    }

    #[test]
    fn made_up_paths_are_other() {
        for path in [
            "/v1/made-up-1",
            "/v1/chat/completions/x/y/z",
            "/v1/models//x",
            "/",
            "",
            "/v1/\u{0}",
            &"/v1/a".repeat(10_000),
        ] {
            assert_eq!(endpoint_label(path), OTHER_ENDPOINT, "{path:.40}");
        }
    }
}
