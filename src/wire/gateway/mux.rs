//! The access controller and Go's `http.ServeMux` in front of etcd's gateway: `/v3beta/` ->
//! `/v3/`, CORS headers on every answer, `OPTIONS` answered 200 with no body, unclean paths and
//! `/v3` redirected (301), `/v3/...` to the [`routes`](super::routes) table, `/version`,
//! `/health`, `/metrics`, `/readyz` to their [`endpoints`](super::endpoints), anything else
//! `404 page not found`.

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;

use super::answer::{empty, plain};
use super::stream::Body;
use super::{endpoints, routes};
use crate::serve::Services;
use crate::wire::body::ReqBody;

/// Answers one non-gRPC HTTP request.
pub async fn handle(req: Request<ReqBody>, services: &Services) -> Response<Body> {
    let start = std::time::Instant::now();
    let metrics = super::observe::handles(req.uri().path());
    let mut resp = route(req, services).await;
    super::observe::answered(metrics, resp.status(), start);
    let h = resp.headers_mut();
    // Upstream answers relayed as is already carry them: keep one copy.
    h.remove("access-control-allow-methods");
    h.remove("access-control-allow-origin");
    h.remove("access-control-allow-headers");
    h.insert(
        "access-control-allow-methods",
        HeaderValue::from_static("POST, GET, OPTIONS, PUT, DELETE"),
    );
    h.insert("access-control-allow-origin", HeaderValue::from_static("*"));
    h.insert(
        "access-control-allow-headers",
        HeaderValue::from_static("accept, content-type, authorization"),
    );
    resp
}

/// Go's `ServeMux` over the paths etcd's client port serves.
async fn route(req: Request<ReqBody>, services: &Services) -> Response<Body> {
    let method = req.method().clone();
    let mut path = percent_decode(req.uri().path());
    if let Some(rest) = path.strip_prefix("/v3beta/") {
        path = format!("/v3/{rest}");
    }
    if method == Method::OPTIONS {
        return empty(StatusCode::OK);
    }
    if method != Method::CONNECT {
        let clean = clean_path(&path);
        if clean != path {
            return redirect(&method, &clean, req.uri().query());
        }
    }
    if path == "/v3" {
        return redirect(&method, "/v3/", req.uri().query());
    }
    if path.starts_with("/v3/") {
        return routes::v3(req, &path, services).await;
    }
    match path.as_str() {
        "/version" => endpoints::version(&method, services).await,
        "/health" => endpoints::health(req, services).await,
        "/debug/vars" | "/config/local/log" => endpoints::relay(req, services).await,
        p => match endpoints::own(p, services) {
            Some(resp) => resp,
            None => plain(StatusCode::NOT_FOUND, "404 page not found"),
        },
    }
}

/// Go's `http.Redirect` with 301, as `ServeMux` sends it.
fn redirect(method: &Method, to: &str, query: Option<&str>) -> Response<Body> {
    let location = match query {
        Some(q) => format!("{to}?{q}"),
        None => to.to_string(),
    };
    let get = method == Method::GET;
    let body = if get {
        format!(
            "<a href=\"{}\">Moved Permanently</a>.\n\n",
            location.replace('&', "&amp;").replace('"', "&#34;")
        )
    } else {
        String::new()
    };
    let mut resp = Response::new(Body::new(Full::new(Bytes::from(body))));
    *resp.status_mut() = StatusCode::MOVED_PERMANENTLY;
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    if get || method == Method::HEAD {
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
    }
    resp
}

/// Decodes `%XX` escapes like Go's `url.URL.Path`.
fn percent_decode(p: &str) -> String {
    if !p.contains('%') {
        return p.to_string();
    }
    let b = p.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(c) = hex {
                out.push(c);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Go's `ServeMux` `cleanPath`: `path.Clean`, keeping a trailing slash.
fn clean_path(p: &str) -> String {
    if p.is_empty() {
        return "/".into();
    }
    let rooted = if p.starts_with('/') {
        p.to_string()
    } else {
        format!("/{p}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for seg in rooted.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    let mut np = format!("/{}", parts.join("/"));
    if rooted.ends_with('/') && np != "/" {
        np.push('/');
    }
    np
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_clean_path() {
        assert_eq!(clean_path("//v3/kv/range"), "/v3/kv/range");
        assert_eq!(clean_path("/v3/kv/range/"), "/v3/kv/range/");
        assert_eq!(clean_path("/v3/./kv/../kv/range"), "/v3/kv/range");
        assert_eq!(clean_path("/"), "/");
        assert_eq!(clean_path("/.."), "/");
    }

    #[test]
    fn percent() {
        assert_eq!(percent_decode("/v3/kv/%72ange"), "/v3/kv/range");
        assert_eq!(percent_decode("/a%2"), "/a%2");
    }
}
