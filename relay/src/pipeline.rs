//! Management API calls to a local emulator (`http://` endpoints) over
//! pipelined HTTP/1.1 connections.
//!
//! The relay posts every event to every recipient, so on the local stack it
//! makes thousands of small requests per second to a few gateways. A
//! general HTTP client spends most of that on its own machinery: a pooled
//! connection per request in flight, a task hop per request, one write and
//! one read system call per request. Here each endpoint has a couple of
//! long-lived connections ([`LANES`]); requests are written back to back (all
//! the requests queued at that moment in one write) and the answers, which
//! HTTP/1.1 returns in request order, are read in bulk and matched in order.
//! Ordering per WebSocket connection does not depend on this: the outbox has
//! at most one post in flight per connection.
//!
//! Requests are plain `POST|DELETE /{stage}/@connections/{id}`, the same the
//! SDK sends, without a SigV4 signature (the emulator checks none). A lane
//! that fails (refused, reset, closed) fails the requests it carries, which
//! the outbox treats like any failed post, and reconnects on the next
//! request.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

/// Connections per endpoint.
pub(crate) const LANES: usize = 2;

/// A finished request: status code and body.
pub(crate) type Answer = Result<(u16, Vec<u8>), String>;

/// One request for a lane.
struct Job {
    request: Vec<u8>,
    reply: oneshot::Sender<Answer>,
}

/// The lanes of one endpoint (`host:port`).
pub(crate) struct Endpoint {
    authority: String,
    lanes: Vec<Mutex<Option<mpsc::UnboundedSender<Job>>>>,
    next: std::sync::atomic::AtomicUsize,
}

impl Endpoint {
    /// Lanes to `authority` (`host:port`), connected on first use.
    pub(crate) fn new(authority: &str) -> Self {
        Self {
            authority: authority.to_owned(),
            lanes: (0..LANES).map(|_| Mutex::new(None)).collect(),
            next: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Sends one request (`method path`, with `body`) and waits for its
    /// answer.
    pub(crate) async fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(String, String)],
        body: &[u8],
    ) -> Answer {
        let mut request = Vec::with_capacity(400 + path.len() + body.len());
        request.extend_from_slice(method.as_bytes());
        request.push(b' ');
        request.extend_from_slice(path.as_bytes());
        request.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        request.extend_from_slice(self.authority.as_bytes());
        for (name, value) in headers {
            request.extend_from_slice(b"\r\n");
            request.extend_from_slice(name.as_bytes());
            request.extend_from_slice(b": ");
            request.extend_from_slice(value.as_bytes());
        }
        request.extend_from_slice(b"\r\ncontent-type: application/json\r\ncontent-length: ");
        request.extend_from_slice(body.len().to_string().as_bytes());
        request.extend_from_slice(b"\r\n\r\n");
        request.extend_from_slice(body);
        let (reply, answer) = oneshot::channel();
        let lane = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % LANES;
        self.send(lane, Job { request, reply })?;
        answer
            .await
            .unwrap_or_else(|_| Err("the connection to the gateway closed".to_owned()))
    }

    /// Hands a job to a lane, starting the lane's connection if it has none
    /// (or its last one ended).
    fn send(&self, lane: usize, job: Job) -> Result<(), String> {
        let mut slot = self.lanes[lane]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let job = match slot.as_ref() {
            Some(tx) => match tx.send(job) {
                Ok(()) => return Ok(()),
                // The lane's connection ended: start a new one.
                Err(mpsc::error::SendError(job)) => job,
            },
            None => job,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(job)
            .map_err(|_| "could not queue the request".to_owned())?;
        tokio::spawn(run_lane(self.authority.clone(), rx));
        *slot = Some(tx);
        Ok(())
    }
}

/// One connection: writes queued requests, reads their answers in order.
/// Ends (failing what it carries) when the connection fails.
async fn run_lane(authority: String, mut jobs: mpsc::UnboundedReceiver<Job>) {
    let waiting: Arc<Mutex<VecDeque<oneshot::Sender<Answer>>>> = Arc::default();
    let fail_all = |waiting: &Mutex<VecDeque<oneshot::Sender<Answer>>>, why: &str| {
        let mut w = waiting.lock().unwrap_or_else(PoisonError::into_inner);
        for reply in w.drain(..) {
            let _ = reply.send(Err(why.to_owned()));
        }
    };
    let stream = match TcpStream::connect(&authority).await {
        Ok(s) => s,
        Err(e) => {
            let why = format!("connecting to {authority}: {e}");
            jobs.close();
            while let Some(job) = jobs.recv().await {
                let _ = job.reply.send(Err(why.clone()));
            }
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let (mut read, mut write) = stream.into_split();
    let reader = {
        let waiting = Arc::clone(&waiting);
        tokio::spawn(async move {
            let mut buf: Vec<u8> = Vec::with_capacity(4096);
            let mut chunk = [0u8; 4096];
            loop {
                // Answer everything complete in the buffer.
                loop {
                    match parse_response(&buf) {
                        Ok(Some((status, body, used))) => {
                            buf.drain(..used);
                            let reply = waiting
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .pop_front();
                            match reply {
                                Some(reply) => {
                                    let _ = reply.send(Ok((status, body)));
                                }
                                None => return "an answer nobody asked for".to_owned(),
                            }
                        }
                        Ok(None) => break,
                        Err(e) => return e,
                    }
                }
                match read.read(&mut chunk).await {
                    Ok(0) => return "the gateway closed the connection".to_owned(),
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) => return format!("reading from the gateway: {e}"),
                }
            }
        })
    };
    let mut reader = Some(reader);
    let mut out: Vec<u8> = Vec::with_capacity(8192);
    let why = loop {
        let Some(running) = reader.as_mut() else {
            break "the connection to the gateway failed".to_owned();
        };
        let first = tokio::select! {
            job = jobs.recv() => match job {
                Some(job) => job,
                None => break "the relay stopped using this connection".to_owned(),
            },
            // The reader ended: the connection failed.
            ended = running => {
                reader = None;
                break ended.unwrap_or_else(|_| "the connection reader failed".to_owned());
            }
        };
        // Everything queued now goes out in one write. Yielding once first
        // lets the tasks that are ready (the shards, other outboxes) queue
        // what they have: the relay's posts come in bursts, one per
        // envelope's recipient, and without it nearly every write carried
        // one request (one loopback `sendto`, and one read at the gateway,
        // per post).
        tokio::task::yield_now().await;
        let mut batch = vec![first];
        while let Ok(job) = jobs.try_recv() {
            batch.push(job);
        }
        out.clear();
        {
            let mut w = waiting.lock().unwrap_or_else(PoisonError::into_inner);
            for job in batch {
                out.extend_from_slice(&job.request);
                w.push_back(job.reply);
            }
        }
        if let Err(e) = write.write_all(&out).await {
            break format!("writing to the gateway: {e}");
        }
    };
    if let Some(reader) = reader {
        reader.abort();
    }
    jobs.close();
    fail_all(&waiting, &why);
    while let Some(job) = jobs.recv().await {
        let _ = job.reply.send(Err(why.clone()));
    }
}

/// Parses one HTTP/1.1 response at the start of `buf`: `Ok(None)` when it
/// is not complete yet, else the status, the body and the bytes used.
pub(crate) fn parse_response(buf: &[u8]) -> Result<Option<(u16, Vec<u8>, usize)>, String> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head =
        std::str::from_utf8(&buf[..head_end]).map_err(|_| "a response head that is not text")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("a bad status line: {status_line:?}"))?;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse().map_err(|_| "a bad content-length")?);
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && value.eq_ignore_ascii_case("chunked")
        {
            chunked = true;
        }
    }
    let body_start = head_end + 4;
    if chunked {
        return parse_chunked(&buf[body_start..])
            .map(|done| done.map(|(body, used)| (status, body, body_start + used)));
    }
    let length = match (length, status) {
        (Some(n), _) => n,
        (None, 204 | 304) | (None, 100..=199) => 0,
        (None, _) => return Err("a response without a length".to_owned()),
    };
    if buf.len() < body_start + length {
        return Ok(None);
    }
    Ok(Some((
        status,
        buf[body_start..body_start + length].to_vec(),
        body_start + length,
    )))
}

/// A chunked body at the start of `buf`: the body and the bytes used, or
/// `None` when incomplete.
fn parse_chunked(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, String> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let Some(line_end) = find(&buf[at..], b"\r\n") else {
            return Ok(None);
        };
        let size_text =
            std::str::from_utf8(&buf[at..at + line_end]).map_err(|_| "a bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "a bad chunk size")?;
        at += line_end + 2;
        if size == 0 {
            // Trailers end with an empty line.
            let Some(end) = find(&buf[at..], b"\r\n") else {
                return Ok(None);
            };
            if end == 0 {
                return Ok(Some((body, at + 2)));
            }
            let Some(trailers_end) = find(&buf[at..], b"\r\n\r\n") else {
                return Ok(None);
            };
            return Ok(Some((body, at + trailers_end + 4)));
        }
        if buf.len() < at + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&buf[at..at + size]);
        at += size + 2;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_answers_with_a_length_and_waits_for_the_rest() {
        let two = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\ndate: x\r\n\r\nHTTP/1.1 410 Gone\r\nx-amzn-ErrorType: GoneException\r\nContent-Length: 18\r\n\r\n{\"message\":null}\r\n";
        let (status, body, used) = parse_response(two).unwrap().unwrap();
        assert_eq!((status, body.len()), (200, 0));
        let (status, body, used2) = parse_response(&two[used..]).unwrap().unwrap();
        assert_eq!(status, 410);
        assert_eq!(body, b"{\"message\":null}\r\n");
        assert_eq!(used + used2, two.len());
        assert_eq!(parse_response(&two[..used - 1]).unwrap(), None);
        assert_eq!(parse_response(&two[used..two.len() - 1]).unwrap(), None);
    }

    #[test]
    fn parses_chunked_answers_and_no_content() {
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nabcd\r\n2\r\nef\r\n0\r\n\r\nrest";
        let (status, body, used) = parse_response(chunked).unwrap().unwrap();
        assert_eq!((status, body.as_slice()), (200, &b"abcdef"[..]));
        assert_eq!(&chunked[used..], b"rest");
        assert_eq!(parse_response(&chunked[..chunked.len() - 6]).unwrap(), None);
        let empty = b"HTTP/1.1 204 No Content\r\ndate: x\r\n\r\n";
        assert_eq!(
            parse_response(empty).unwrap(),
            Some((204, Vec::new(), empty.len()))
        );
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
    }
}
