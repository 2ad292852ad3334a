//! The web demo's static files: embedded into the binary at build time, or read from a folder
//! (`--web-root`) during development.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use rust_embed::RustEmbed;

use crate::state::AppState;

#[derive(RustEmbed)]
#[folder = "../web-demo/public/"]
struct Assets;

/// Maps a URL path to a relative file path, refusing anything that could leave the root.
pub fn safe_relative(path: &str) -> Option<PathBuf> {
    let trimmed = path.trim_start_matches('/');
    let rel = if trimmed.is_empty() { "index.html" } else { trimmed };
    let p = Path::new(rel);
    if p.components().all(|c| matches!(c, Component::Normal(_))) { Some(p.to_path_buf()) } else { None }
}

pub async fn serve(State(state): State<Arc<AppState>>, uri: Uri) -> Response {
    let Some(rel) = safe_relative(uri.path()) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let body: Option<Vec<u8>> = match &state.config.web_root {
        Some(root) => tokio::fs::read(root.join(&rel)).await.ok(),
        None => Assets::get(&rel.to_string_lossy()).map(|f| f.data.into_owned()),
    };
    match body {
        Some(bytes) => {
            let mime = mime_guess::from_path(&rel).first_or_octet_stream();
            (
                [
                    (header::CONTENT_TYPE, mime.essence_str().to_owned()),
                    (header::CACHE_CONTROL, "no-cache".to_owned()),
                    (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
                ],
                bytes,
            )
                .into_response()
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_cannot_escape_the_root() {
        assert_eq!(safe_relative("/"), Some(PathBuf::from("index.html")));
        assert_eq!(safe_relative("/app.js"), Some(PathBuf::from("app.js")));
        assert_eq!(safe_relative("/js/x.js"), Some(PathBuf::from("js/x.js")));
        for bad in ["/../etc/passwd", "/a/../../b", "/./x", "//etc/passwd/.."] {
            assert_eq!(safe_relative(bad), None, "{bad}");
        }
    }
}
