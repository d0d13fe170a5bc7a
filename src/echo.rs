//! A tiny HTTP/1.1 echo upstream for `make run` and the end-to-end tests (native only).
//!
//! It answers every request with JSON describing it: method, path, headers and body, so a
//! caller can see exactly what the filter forwarded. Two request headers steer it, for tests:
//! `x-echo-status: 404` picks the status, `x-echo-header: name: value` adds a response header
//! (repeatable as a comma-free list via several headers is not needed; one is enough),
//! `x-echo-delay-ms: 2000` holds the answer that long (at most [`MAX_DELAY_MS`]) after the
//! request was received and recorded: a slow backend, for in-flight tests.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// A request as the upstream received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A running echo server; dropping the handle leaves it running (it dies with the process).
#[derive(Clone)]
pub struct EchoServer {
    pub port: u16,
    received: Arc<Mutex<Vec<Received>>>,
}

const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 32 * 1024 * 1024;
/// Longest `x-echo-delay-ms` honoured.
pub const MAX_DELAY_MS: u64 = 60_000;

impl EchoServer {
    /// Binds `addr` (e.g. `127.0.0.1:0`) and serves in background threads.
    pub fn start(addr: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let port = listener.local_addr()?.port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let rec = Arc::clone(&received);
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let rec = Arc::clone(&rec);
                thread::spawn(move || {
                    let _ = serve(stream, &rec);
                });
            }
        });
        Ok(Self { port, received })
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().map(|v| v.clone()).unwrap_or_default()
    }

    pub fn clear(&self) {
        if let Ok(mut v) = self.received.lock() {
            v.clear();
        }
    }
}

fn serve(stream: TcpStream, rec: &Mutex<Vec<Received>>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(90)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let req = match read_request(&mut reader)? {
            Some(r) => r,
            None => return Ok(()),
        };
        let close = req
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let status: u16 = req
            .header("x-echo-status")
            .and_then(|s| s.parse().ok())
            .filter(|s| (200..600).contains(s))
            .unwrap_or(200);
        let extra = req
            .header("x-echo-header")
            .and_then(|h| h.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()));
        let body = serde_json::to_vec(&serde_json::json!({
            "method": req.method,
            "path": req.path,
            "headers": req.headers,
            "body": String::from_utf8_lossy(&req.body),
            "body_len": req.body.len(),
        }))
        .unwrap_or_default();
        let delay_ms = req
            .header("x-echo-delay-ms")
            .and_then(|s| s.parse::<u64>().ok())
            .map_or(0, |d| d.min(MAX_DELAY_MS));
        if let Ok(mut v) = rec.lock() {
            v.push(req);
        }
        if delay_ms > 0 {
            thread::sleep(Duration::from_millis(delay_ms));
        }
        let mut head = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
            body.len()
        );
        if let Some((k, v)) = extra {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if close {
            head.push_str("connection: close\r\n");
        }
        head.push_str("\r\n");
        writer.write_all(head.as_bytes())?;
        writer.write_all(&body)?;
        writer.flush()?;
        if close {
            return Ok(());
        }
    }
}

fn read_line(r: &mut impl BufRead, budget: &mut usize) -> std::io::Result<Option<String>> {
    let mut line = Vec::new();
    let n = r.take(*budget as u64).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    *budget = budget.saturating_sub(n);
    if !line.ends_with(b"\n") {
        return Err(std::io::Error::other("header too long"));
    }
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

fn read_request(r: &mut impl BufRead) -> std::io::Result<Option<Received>> {
    let mut budget = MAX_HEAD;
    let start = match read_line(r, &mut budget)? {
        Some(l) => l,
        None => return Ok(None),
    };
    let mut parts = start.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    loop {
        match read_line(r, &mut budget)? {
            None => return Ok(None),
            Some(l) if l.is_empty() => break,
            Some(l) => {
                if let Some((k, v)) = l.split_once(':') {
                    headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                }
            }
        }
    }
    let mut req = Received {
        method,
        path,
        headers,
        body: Vec::new(),
    };
    let chunked = req
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        loop {
            let mut b = MAX_HEAD;
            let size_line = read_line(r, &mut b)?.unwrap_or_default();
            let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| std::io::Error::other("bad chunk size"))?;
            if size == 0 {
                // Trailers until the blank line.
                while let Some(l) = read_line(r, &mut b)? {
                    if l.is_empty() {
                        break;
                    }
                }
                break;
            }
            if req.body.len() + size > MAX_BODY {
                return Err(std::io::Error::other("body too large"));
            }
            let start = req.body.len();
            req.body.resize(start + size, 0);
            r.read_exact(&mut req.body[start..])?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf)?;
        }
    } else if let Some(len) = req
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        if len > MAX_BODY {
            return Err(std::io::Error::other("body too large"));
        }
        req.body.resize(len, 0);
        r.read_exact(&mut req.body)?;
    }
    Ok(Some(req))
}
