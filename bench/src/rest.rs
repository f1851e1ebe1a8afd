//! A small keep-alive HTTP/1.1 client for the REST calls of the set-up
//! phase (creating rooms) and for scraping `/metrics`.
//!
//! Plain `hyper` connection API over one TCP connection, reopened when the
//! server closes it: the set-up makes a few thousand calls, so there is no
//! need for a pool.

use anyhow::{Context as _, bail};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

/// One keep-alive connection to one base URL (`http://host:port`).
pub struct Rest {
    /// `host:port`.
    authority: String,
    /// The open connection, if any.
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Rest {
    /// A client for `base` (`http://host:port`, no path).
    ///
    /// # Errors
    /// When `base` is not an `http://` URL.
    pub fn new(base: &str) -> anyhow::Result<Self> {
        let authority = base
            .strip_prefix("http://")
            .context("only http:// URLs are supported")?
            .trim_end_matches('/')
            .to_owned();
        Ok(Self {
            authority,
            sender: None,
        })
    }

    async fn sender(&mut self) -> anyhow::Result<&mut SendRequest<Full<Bytes>>> {
        let reusable = match &mut self.sender {
            Some(s) => s.ready().await.is_ok(),
            None => false,
        };
        if !reusable {
            let stream = TcpStream::connect(&self.authority)
                .await
                .with_context(|| format!("connecting to {}", self.authority))?;
            stream.set_nodelay(true)?;
            let (sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::task::spawn_local(async move {
                let _ = conn.await;
            });
            self.sender = Some(sender);
        }
        self.sender.as_mut().context("no connection")
    }

    /// Sends a request and reads the whole answer.
    ///
    /// # Errors
    /// Connection failures.
    pub async fn call(
        &mut self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, self.authority.as_str());
        if let Some(token) = token {
            request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let bytes = match body {
            Some(v) => {
                request = request.header(http::header::CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(v)?)
            }
            None => Bytes::new(),
        };
        let request = request.body(Full::new(bytes))?;
        let sender = self.sender().await?;
        let response = match sender.send_request(request).await {
            Ok(r) => r,
            Err(e) => {
                self.sender = None;
                return Err(e.into());
            }
        };
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }

    /// A JSON call that must succeed (2xx); returns the parsed body.
    ///
    /// # Errors
    /// Connection failures, non-2xx answers (with their body), bad JSON.
    pub async fn json(
        &mut self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let (status, bytes) = self.call(method.clone(), path, token, body).await?;
        if !status.is_success() {
            bail!(
                "{method} {path}: {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        serde_json::from_slice(&bytes).with_context(|| format!("{method} {path}: not JSON"))
    }
}

/// The `name value` samples of a Prometheus text exposition (comments and
/// labels kept in the name: `a{b="c"}` is its own series).
pub fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (name, value) = l.trim().rsplit_once(' ')?;
            Some((name.trim().to_owned(), value.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_parses_into_series() {
        let text = "# HELP x y\n# TYPE x counter\nx 3\nchat_y{kind=\"a b\"} 4.5\n\n";
        assert_eq!(
            parse_prometheus(text),
            vec![("x".into(), 3.0), ("chat_y{kind=\"a b\"}".into(), 4.5)]
        );
    }

    #[test]
    fn only_http_bases() {
        assert!(Rest::new("https://x").is_err());
        assert!(Rest::new("http://127.0.0.1:1/").is_ok());
    }
}
