//! The browser chat page (`web/static/`), embedded in the binary and served at `/` when
//! [`ApiConfig::web_ui`](crate::ApiConfig::web_ui) is on (`zhibo dev` turns it on).
//!
//! Plain ES modules and a committed copy of the TypeScript SDK's browser build (`web/static/sdk/`,
//! built from `clients/typescript`, which embeds the gateway's own `client.proto`): no build step here,
//! so `cargo build` needs no npm; `web/test/run.sh` checks the copy equals a fresh build of the SDK.
//! `/config.json` tells the page where the gateway's WebSocket listens. None of this is under `/v1` or in
//! the OpenAPI document: it is a development page, not API.

use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
    X_FRAME_OPTIONS,
};
use axum::http::HeaderValue;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

/// One embedded file: path served, content type, bytes.
type Asset = (&'static str, &'static str, &'static [u8]);

const JS: &str = "text/javascript; charset=utf-8";

/// Every file of the page. Paths are outside `/v1`.
const ASSETS: &[Asset] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_bytes!("../../web/static/index.html"),
    ),
    (
        "/style.css",
        "text/css; charset=utf-8",
        include_bytes!("../../web/static/style.css"),
    ),
    ("/app.js", JS, include_bytes!("../../web/static/app.js")),
    ("/api.js", JS, include_bytes!("../../web/static/api.js")),
    // The SDK (clients/typescript, `npm run build`): it owns the WebSocket and the protocol.
    (
        "/sdk/zhibo-client.js",
        JS,
        include_bytes!("../../web/static/sdk/zhibo-client.js"),
    ),
    (
        "/sdk/LICENSES.txt",
        "text/plain; charset=utf-8",
        include_bytes!("../../web/static/sdk/LICENSES.txt"),
    ),
];

/// The page's routes: the files above and `GET /config.json` = `{"ws_url": ws_url}`. An empty `ws_url`
/// makes the page use port 7002 on its own host. Every response carries [`csp`] and
/// `X-Frame-Options: DENY` (no framing, so no clickjacking of the sign-in form).
pub(crate) fn router<S: Clone + Send + Sync + 'static>(ws_url: &str) -> Router<S> {
    let mut router = Router::new();
    for &(path, content_type, body) in ASSETS {
        router = router.route(path, get(move || async move { asset(content_type, body) }));
    }
    let config = serde_json::json!({ "ws_url": ws_url }).to_string();
    let csp = HeaderValue::from_str(&csp(ws_url))
        .unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'"));
    router
        .route(
            "/config.json",
            get(move || async move { asset("application/json", config.into_bytes()) }),
        )
        .layer(axum::middleware::map_response(
            move |mut response: axum::response::Response| {
                let csp = csp.clone();
                async move {
                    let headers = response.headers_mut();
                    headers.insert(CONTENT_SECURITY_POLICY, csp);
                    headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
                    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
                    response
                }
            },
        ))
}

/// The page's Content-Security-Policy: scripts, styles and fetches from this origin only (the page has
/// no inline script or style), the WebSocket of `ws_url` (or any `ws:`/`wss:` when the page derives it
/// from its own host, on another port), no plugins, no framing. `'unsafe-eval'` because protobuf.js (in
/// the SDK) compiles its encoders with `Function` at load; no inline script can run, so nothing injected
/// can reach it.
fn csp(ws_url: &str) -> String {
    let ws = ws_url
        .split_once("://")
        .map(|(scheme, rest)| {
            let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
            format!("{scheme}://{authority}")
        })
        .filter(|origin| origin.len() > "ws://".len() && !origin.contains([' ', ';', ',']))
        .unwrap_or_else(|| "ws: wss:".to_owned());
    format!(
        "default-src 'none'; script-src 'self' 'unsafe-eval'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self' {ws}; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; \
         object-src 'none'"
    )
}

/// A file, revalidated on every load (a dev page: a rebuilt binary must never serve a stale script).
fn asset(content_type: &'static str, body: impl Into<axum::body::Body>) -> impl IntoResponse {
    (
        [
            (CONTENT_TYPE, content_type),
            (CACHE_CONTROL, "no-cache"),
            (X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body.into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csp_names_the_websocket_origin() {
        assert!(
            csp("ws://127.0.0.1:7002/ws?x=1").contains("connect-src 'self' ws://127.0.0.1:7002;")
        );
        assert!(csp("").contains("connect-src 'self' ws: wss:;"));
        assert!(csp("wss://im.example.com/ws").contains("wss://im.example.com;"));
    }

    #[test]
    fn no_page_route_is_api() {
        for (path, _, body) in ASSETS {
            assert!(!path.starts_with("/v1"), "{path} would shadow the API");
            assert!(!body.is_empty(), "{path} is empty");
        }
        assert!(crate::route_table()
            .iter()
            .all(|(_, p)| ASSETS.iter().all(|(a, _, _)| a != p) && *p != "/config.json"));
    }

    #[tokio::test]
    async fn serves_the_page_the_sdk_and_the_config() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let app: Router = router("ws://127.0.0.1:9/ws");
        tokio::spawn(async move { axum::serve(listener, app).await });
        let http = reqwest::Client::new();
        let get = |path: &'static str| {
            let req = http.get(format!("{base}{path}"));
            async move {
                let r = req.send().await.expect("request");
                let ct = r.headers()[CONTENT_TYPE].to_str().expect("ct").to_owned();
                (r.status().as_u16(), ct, r.text().await.expect("body"))
            }
        };
        let (status, ct, html) = get("/").await;
        assert_eq!((status, ct.as_str()), (200, "text/html; charset=utf-8"));
        assert!(html.contains("app.js"));
        // The page runs under its CSP: no inline script or style, no inline event handler.
        for inline in [
            "<script>",
            "<style",
            " style=",
            " onclick=",
            " onload=",
            "javascript:",
        ] {
            assert!(!html.contains(inline), "inline {inline:?} would be blocked");
        }
        for script in html.split("<script").skip(1) {
            assert!(script.contains("src=\"/"), "inline script: {script}");
        }
        for path in ["/", "/app.js", "/config.json"] {
            let r = http
                .get(format!("{base}{path}"))
                .send()
                .await
                .expect("request");
            let h = r.headers();
            assert_eq!(h[X_FRAME_OPTIONS], "DENY", "{path}");
            let policy = h[CONTENT_SECURITY_POLICY].to_str().expect("csp");
            assert!(
                policy.contains("script-src 'self' 'unsafe-eval';"),
                "{policy}"
            );
            assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
            assert!(
                policy.contains("connect-src 'self' ws://127.0.0.1:9;"),
                "{policy}"
            );
        }
        // The page imports the SDK's browser build, which carries the gateway's own client.proto.
        let (_, _, app) = get("/app.js").await;
        assert!(app.contains("from './sdk/zhibo-client.js'"), "{app}");
        let (status, ct, sdk) = get("/sdk/zhibo-client.js").await;
        assert_eq!((status, ct.as_str()), (200, JS));
        assert!(sdk.contains("message Packet") && sdk.contains("LocalStorageSeqStore"));
        let (status, ct, config) = get("/config.json").await;
        assert_eq!((status, ct.as_str()), (200, "application/json"));
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&config).expect("json")["ws_url"],
            "ws://127.0.0.1:9/ws"
        );
    }
}
