//! The web console: one page of HTML, CSS and JavaScript modules, embedded in the binary
//! and served at `/`.
//!
//! The page itself is public (it holds no data); every API call it makes carries the
//! admin key the user pastes into it, so these routes stay outside the auth layers. Nothing
//! loads from outside the gateway: the Content-Security-Policy allows only this origin,
//! which is also what lets the page load its ES modules (`script-src 'self'`) with no
//! build step. The files are compressed for clients that accept it; the `/v1` proxy never
//! passes through this router.

use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tower_http::compression::CompressionLayer;

/// Only this origin, for everything; no inline scripts or styles, no framing.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
    style-src 'self'; img-src 'self'; connect-src 'self'; object-src 'none'; \
    base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

const HTML: &str = "text/html; charset=utf-8";
const JAVASCRIPT: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const SVG: &str = "image/svg+xml";

/// One embedded file and the path it is served at.
struct Asset {
    path: &'static str,
    body: &'static str,
    content_type: &'static str,
}

macro_rules! asset {
    ($path:literal, $file:literal, $content_type:expr) => {
        Asset {
            path: $path,
            body: include_str!($file),
            content_type: $content_type,
        }
    };
}

/// Every file of the console. A module added under `js/` needs a line here; the tests
/// check that every `import` names a file in this table.
const ASSETS: &[Asset] = &[
    asset!("/", "index.html", HTML),
    asset!("/console/style.css", "style.css", CSS),
    asset!("/console/favicon.svg", "favicon.svg", SVG),
    asset!("/console/js/main.js", "js/main.js", JAVASCRIPT),
    asset!("/console/js/api.js", "js/api.js", JAVASCRIPT),
    asset!("/console/js/banner.js", "js/banner.js", JAVASCRIPT),
    asset!("/console/js/chart.js", "js/chart.js", JAVASCRIPT),
    asset!("/console/js/dom.js", "js/dom.js", JAVASCRIPT),
    asset!("/console/js/format.js", "js/format.js", JAVASCRIPT),
    asset!("/console/js/polling.js", "js/polling.js", JAVASCRIPT),
    asset!("/console/js/router.js", "js/router.js", JAVASCRIPT),
    asset!("/console/js/session.js", "js/session.js", JAVASCRIPT),
    asset!("/console/js/pages/keys.js", "js/pages/keys.js", JAVASCRIPT),
    asset!(
        "/console/js/pages/models.js",
        "js/pages/models.js",
        JAVASCRIPT
    ),
    asset!(
        "/console/js/pages/playground.js",
        "js/pages/playground.js",
        JAVASCRIPT
    ),
    asset!(
        "/console/js/pages/signin.js",
        "js/pages/signin.js",
        JAVASCRIPT
    ),
    asset!(
        "/console/js/pages/system.js",
        "js/pages/system.js",
        JAVASCRIPT
    ),
    asset!(
        "/console/js/pages/usage.js",
        "js/pages/usage.js",
        JAVASCRIPT
    ),
];

/// The console's routes: `/` and every file under `/console/`; any other `/console/...`
/// path is not found. Generic over the state so it merges into any router.
pub fn router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    ASSETS
        .iter()
        .fold(Router::new(), |router, asset| {
            router.route(asset.path, get(move || async move { asset.response() }))
        })
        .layer(CompressionLayer::new())
}

impl Asset {
    /// `no-cache` so a new binary's console is picked up at once.
    fn response(&self) -> Response {
        (
            [
                (CONTENT_TYPE, HeaderValue::from_static(self.content_type)),
                (CACHE_CONTROL, HeaderValue::from_static("no-cache")),
                (
                    HeaderName::from_static("content-security-policy"),
                    HeaderValue::from_static(CONTENT_SECURITY_POLICY),
                ),
                (
                    HeaderName::from_static("x-content-type-options"),
                    HeaderValue::from_static("nosniff"),
                ),
                (
                    HeaderName::from_static("referrer-policy"),
                    HeaderValue::from_static("no-referrer"),
                ),
            ],
            self.body,
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::io::Read;

    use axum::body::{to_bytes, Body};
    use axum::http::header::{ACCEPT_ENCODING, CONTENT_ENCODING};
    use axum::http::{HeaderMap, Request, StatusCode};
    use tower::ServiceExt;

    use super::*;

    async fn fetch_with(request: Request<Body>) -> (StatusCode, HeaderMap, Vec<u8>) {
        let response = router::<()>().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
        (status, headers, body.to_vec())
    }

    async fn fetch(path: &str) -> (StatusCode, HeaderMap, String) {
        let (status, headers, body) =
            fetch_with(Request::get(path).body(Body::empty()).unwrap()).await;
        (status, headers, String::from_utf8(body).unwrap())
    }

    fn asset(path: &str) -> &'static Asset {
        ASSETS
            .iter()
            .find(|asset| asset.path == path)
            .unwrap_or_else(|| panic!("{path} is not served"))
    }

    fn modules() -> impl Iterator<Item = &'static Asset> {
        ASSETS
            .iter()
            .filter(|asset| asset.content_type == JAVASCRIPT)
    }

    /// The module specifiers of `import ... from "..."` and `export ... from "..."`
    /// lines, each resolved against the importing module's path.
    fn imports_of(module: &Asset) -> Vec<String> {
        let dir = &module.path[..module.path.rfind('/').unwrap()];
        module
            .body
            .lines()
            .map(str::trim_start)
            .filter(|line| line.starts_with("import ") || line.starts_with("export "))
            .filter_map(|line| {
                let (_, rest) = line
                    .split_once(" from \"")
                    .or_else(|| line.strip_prefix("import \"").map(|rest| ("", rest)))?;
                let specifier = &rest[..rest.find('"')?];
                Some(resolve(dir, specifier, module.path))
            })
            .collect()
    }

    /// A relative specifier against a directory, as the browser resolves it.
    fn resolve(dir: &str, specifier: &str, importer: &str) -> String {
        assert!(
            specifier.starts_with("./") || specifier.starts_with("../"),
            "{importer} imports {specifier:?}: only relative paths load without an import map"
        );
        let mut parts: Vec<&str> = dir.split('/').filter(|p| !p.is_empty()).collect();
        for part in specifier.split('/') {
            match part {
                "." => {}
                ".." => {
                    parts.pop();
                }
                name => parts.push(name),
            }
        }
        format!("/{}", parts.join("/"))
    }

    #[tokio::test]
    async fn root_serves_the_page_with_a_strict_policy() {
        let (status, headers, body) = fetch("/").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[CONTENT_TYPE], "text/html; charset=utf-8");
        assert_eq!(headers[CACHE_CONTROL], "no-cache");
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert_eq!(csp, CONTENT_SECURITY_POLICY);
        assert!(csp.starts_with("default-src 'self'"), "{csp}");
        assert!(csp.contains("script-src 'self';"), "{csp}");
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert!(body.contains(r#"<script type="module" src="/console/js/main.js"></script>"#));
        assert!(body.contains(r#"href="/console/style.css""#));
        assert!(body.contains(r#"data-testid="signin-key""#));
        assert_eq!(
            body.matches("<script").count(),
            1,
            "one module script, nothing inline"
        );
    }

    #[tokio::test]
    async fn every_module_is_served_as_javascript_with_the_policy() {
        let mut served = 0;
        for module in modules() {
            let (status, headers, body) = fetch(module.path).await;
            assert_eq!(status, StatusCode::OK, "{}", module.path);
            assert_eq!(
                headers[CONTENT_TYPE], "text/javascript; charset=utf-8",
                "{}",
                module.path
            );
            assert_eq!(headers[CACHE_CONTROL], "no-cache", "{}", module.path);
            assert_eq!(
                headers["content-security-policy"], CONTENT_SECURITY_POLICY,
                "{}",
                module.path
            );
            assert_eq!(headers["x-content-type-options"], "nosniff");
            assert_eq!(body, module.body);
            served += 1;
        }
        assert!(served >= 8, "one module per page plus the shared ones");

        let (status, headers, _) = fetch("/console/style.css").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[CONTENT_TYPE], "text/css; charset=utf-8");
        let (status, headers, _) = fetch("/console/favicon.svg").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[CONTENT_TYPE], "image/svg+xml");
    }

    #[tokio::test]
    async fn a_file_the_console_does_not_have_is_not_found() {
        for path in [
            "/console/js/missing.js",
            "/console/js/pages/missing.js",
            "/console/app.js",
            "/console/js/",
            "/console/js/main.js/x",
        ] {
            let (status, _, _) = fetch(path).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        }
    }

    #[test]
    fn every_import_names_a_served_module_and_every_module_is_loaded() {
        let served: BTreeSet<&str> = modules().map(|module| module.path).collect();
        let mut loaded = BTreeSet::from(["/console/js/main.js".to_string()]);
        let mut queue = vec!["/console/js/main.js".to_string()];
        while let Some(path) = queue.pop() {
            for import in imports_of(asset(&path)) {
                assert!(
                    served.contains(import.as_str()),
                    "{path} imports {import}, which is not served"
                );
                if loaded.insert(import.clone()) {
                    queue.push(import);
                }
            }
        }
        let unused: Vec<_> = served
            .iter()
            .filter(|path| !loaded.contains(**path))
            .collect();
        assert!(unused.is_empty(), "served but never imported: {unused:?}");
        // Every page has its module.
        for page in ["signin", "models", "keys", "usage", "system", "playground"] {
            assert!(loaded.contains(&format!("/console/js/pages/{page}.js")));
        }
    }

    #[test]
    fn the_import_parser_sees_what_the_browser_sees() {
        let module = Asset {
            path: "/console/js/pages/x.js",
            body: "import { a } from \"../api.js\";\n  import * as b from \"./b.js\";\n\
                   import \"../side.js\";\nexport { c } from \"../../c.js\";\n\
                   // import { d } from \"./d.js\";\nconst s = \"import\";\n",
            content_type: JAVASCRIPT,
        };
        assert_eq!(
            imports_of(&module),
            [
                "/console/js/api.js",
                "/console/js/pages/b.js",
                "/console/js/side.js",
                "/console/c.js"
            ]
        );
    }

    #[test]
    fn the_keys_live_in_the_tab_only() {
        let session = asset("/console/js/session.js").body;
        assert!(session.contains("sessionStorage"));
        for module in modules() {
            assert!(
                !module.body.contains("localStorage."),
                "{}: the key must not outlive the tab",
                module.path
            );
        }
    }

    #[tokio::test]
    async fn files_are_gzipped_for_clients_that_ask() {
        for path in ["/", "/console/js/main.js", "/console/style.css"] {
            let (status, headers, body) = fetch_with(
                Request::get(path)
                    .header(ACCEPT_ENCODING, "gzip")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
            assert_eq!(status, StatusCode::OK, "{path}");
            assert_eq!(headers[CONTENT_ENCODING], "gzip", "{path}");
            assert_eq!(
                headers["content-security-policy"], CONTENT_SECURITY_POLICY,
                "{path}"
            );
            let mut text = String::new();
            flate2::read::GzDecoder::new(&body[..])
                .read_to_string(&mut text)
                .unwrap();
            assert_eq!(text, asset(path).body, "{path}");
            assert!(body.len() < text.len(), "{path} is smaller compressed");

            let (_, headers, body) = fetch(path).await;
            assert!(!headers.contains_key(CONTENT_ENCODING), "{path}");
            assert_eq!(body, asset(path).body, "{path}");
        }
    }

    #[test]
    fn the_page_loads_nothing_from_outside() {
        for asset in ASSETS {
            // The SVG namespace is a name, not a download.
            let text = asset.body.replace("http://www.w3.org/2000/svg", "");
            for needle in ["http://", "https://", "//cdn", "@import"] {
                assert!(!text.contains(needle), "{} mentions {needle}", asset.path);
            }
        }
    }
}
