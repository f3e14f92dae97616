//! The embedded browser client: the chat page (`/`), its script and stylesheet, the
//! JavaScript SDK (`/hubbub.js`) and the admin console (`/admin`, on the server API), compiled into the binary so that a user needs
//! nothing but `hubbub` to get a working chat.
//!
//! Owns: serving the files in `web/` with the right content types. Must not: know
//! anything about the protocol (the SDK does, in the browser).

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::IntoResponse;
use axum::routing::get;

const INDEX_HTML: &str = include_str!("../web/index.html");
const APP_JS: &str = include_str!("../web/app.js");
const SDK_JS: &str = include_str!("../web/hubbub.js");
const STYLE_CSS: &str = include_str!("../web/style.css");
const ADMIN_HTML: &str = include_str!("../web/admin.html");
const ADMIN_JS: &str = include_str!("../web/admin.js");
const ADMIN_CSS: &str = include_str!("../web/admin.css");

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

fn file(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // The files change with the binary; let browsers revalidate each load.
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
}

/// The Content-Security-Policy of the pages: scripts, styles and connections from
/// this origin only (the pages have no inline script or style), and framing only
/// by `frame_ancestors` (`--frame-ancestors`).
fn csp(frame_ancestors: &str) -> String {
    format!(
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; \
         frame-ancestors {frame_ancestors}"
    )
}

/// A page, with its Content-Security-Policy.
fn page(policy: HeaderValue, body: &'static str) -> impl IntoResponse {
    (
        [(header::CONTENT_SECURITY_POLICY, policy)],
        file(HTML, body),
    )
}

/// Routes for the pages and the SDK; merged into the server's router.
pub fn routes<S: Clone + Send + Sync + 'static>(frame_ancestors: &str) -> Router<S> {
    // Checked at start (config), so this only falls back on a value that cannot
    // be a header, which the config refuses.
    let policy = HeaderValue::from_str(&csp(frame_ancestors))
        .unwrap_or_else(|_| HeaderValue::from_static("frame-ancestors 'none'"));
    let (p1, p2, p3) = (policy.clone(), policy.clone(), policy);
    Router::new()
        .route("/", get(move || async move { page(p1, INDEX_HTML) }))
        .route(
            "/index.html",
            get(move || async move { page(p2, INDEX_HTML) }),
        )
        .route("/app.js", get(|| async { file(JS, APP_JS) }))
        // The SDK may be imported by pages on other origins (it holds no secret;
        // who may connect is `--allowed-origins`' business, at the WebSocket).
        .route(
            "/hubbub.js",
            get(|| async {
                (
                    [(header::ACCESS_CONTROL_ALLOW_ORIGIN, "*")],
                    file(JS, SDK_JS),
                )
            }),
        )
        .route("/style.css", get(|| async { file(CSS, STYLE_CSS) }))
        // The admin console: a page on the server API (it holds no secret itself).
        .route("/admin", get(move || async move { page(p3, ADMIN_HTML) }))
        .route("/admin.js", get(|| async { file(JS, ADMIN_JS) }))
        .route("/admin.css", get(|| async { file(CSS, ADMIN_CSS) }))
}
