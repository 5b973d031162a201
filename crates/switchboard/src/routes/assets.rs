//! The page files of `static/`: embedded in the binary, or read from
//! `SWITCHBOARD_STATIC_DIR` when set (for editing pages without a rebuild).

use std::borrow::Cow;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use rust_embed::RustEmbed;

use crate::state::AppState;

#[derive(RustEmbed)]
#[folder = "../../static/"]
struct Embedded;

/// Routes `/`, `/call` and `/{file}`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(|state: State<AppState>| serve(state, "index.html")))
        .route("/call", get(|state: State<AppState>| serve(state, "call.html")))
        .route(
            "/{*path}",
            get(|state: State<AppState>, Path(path): Path<String>| async move { serve(state, &path).await }),
        )
}

/// The pages' Content-Security-Policy. The pages load their scripts and the
/// style sheet from this server, open their WebSocket to it (`connect-src
/// 'self'` covers `ws:`/`wss:` to the same host), show camera streams
/// (`srcObject`, no URL) and a `data:` favicon; nothing inline, nothing from
/// elsewhere. No one may frame them (clickjacking the call controls), and
/// forms post only here.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; media-src 'self' blob: mediastream:; connect-src 'self'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

/// True for a relative path of plain names: no `..`, no hidden files, no backslashes.
fn is_safe(path: &str) -> bool {
    !path.is_empty() && path.split('/').all(|part| !part.is_empty() && !part.starts_with('.') && !part.contains('\\'))
}

/// The `Content-Type` of a page file: by its extension, except that `.ts`
/// (TypeScript declarations here, an MPEG stream to `mime_guess`) is text.
fn content_type(path: &str) -> String {
    if path.ends_with(".ts") {
        return "application/typescript; charset=utf-8".to_owned();
    }
    mime_guess::from_path(path).first_or_octet_stream().as_ref().to_owned()
}

async fn serve(State(state): State<AppState>, path: &str) -> Response {
    if !is_safe(path) {
        return StatusCode::NOT_FOUND.into_response();
    }
    let body: Option<Cow<'static, [u8]>> = match &state.settings.static_dir {
        Some(dir) => tokio::fs::read(dir.join(path)).await.ok().map(Cow::Owned),
        None => Embedded::get(path).map(|file| file.data),
    };
    match body {
        Some(bytes) => {
            let headers = [
                (header::CONTENT_TYPE, content_type(path)),
                (header::CACHE_CONTROL, "no-cache".to_owned()),
                // A call page's URL may carry its user's token: never send it on as a Referer.
                (header::REFERRER_POLICY, "no-referrer".to_owned()),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
                (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY.to_owned()),
                // For browsers without CSP's frame-ancestors.
                (header::X_FRAME_OPTIONS, "DENY".to_owned()),
            ];
            (headers, bytes).into_response()
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn refuses_escaping_paths() {
        for bad in ["", "../Cargo.toml", "a/../../b", ".env", "a//b", "a\\..\\b", "/etc/passwd"] {
            assert!(!super::is_safe(bad), "{bad}");
        }
        assert!(super::is_safe("img/call.png"));
    }

    #[test]
    fn typescript_declarations_are_text() {
        assert_eq!(super::content_type("switchboard.d.ts"), "application/typescript; charset=utf-8");
        assert_eq!(super::content_type("switchboard.js"), "text/javascript");
    }
}
