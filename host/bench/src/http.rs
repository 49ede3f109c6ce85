//! `kframe bench http`: what the HTTP layer costs over the engine it serves, in
//! one run. The server is a child `kframe serve` process on loopback; the load
//! comes from this process over plain TCP (HTTP/1.1, server-sent events).
//!
//! - Throughput: `concurrent` tenants each stream one completion of
//!   `max_tokens` greedy tokens, through HTTP and, with the same prompts, frames
//!   and engine settings, through an in-process engine; the ratio of aggregate
//!   tok/s is `http_over_engine`. Time to first token is when the first `data:`
//!   event arrives.
//! - Load: `load_tenants` tenants x `requests_per_tenant` requests, each prompt
//!   holding the tenant's own secret; every response is checked for errors and
//!   for any other tenant's secret.

use crate::serve::{drain, model_dir};
use candle_core::{DType, Device};
use kframe_core::keys::MasterSecret;
use kframe_engine::{Engine, EngineConfig, Submit, Tenant};
use kframe_model::generate::SamplingParams;
use kframe_model::ModelBundle;
use kframe_policy::{Limits, PluginRuntime, PolicySet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone)]
pub struct HttpBenchOptions {
    pub concurrent: usize,
    pub max_tokens: usize,
    pub load_tenants: usize,
    pub requests_per_tenant: usize,
}

impl Default for HttpBenchOptions {
    fn default() -> Self {
        Self { concurrent: 256, max_tokens: 32, load_tenants: 1000, requests_per_tenant: 10 }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct HttpReport {
    pub model: String,
    pub machine: String,
    pub concurrent: usize,
    pub max_tokens: usize,
    pub engine_tok_s: f64,
    pub http_tok_s: f64,
    pub http_over_engine: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub load_tenants: usize,
    pub load_requests: usize,
    pub load_seconds: f64,
    pub errors: usize,
    pub cross_tenant_leaks: usize,
}

impl HttpReport {
    pub fn to_text(&self) -> String {
        format!(
            "model: {}\nmachine: {}\n\
             {} concurrent tenants x {} tokens: engine {:.0} tok/s, HTTP {:.0} tok/s, http_over_engine {:.3}\n\
             time to first token over HTTP: p50 {:.1} ms, p99 {:.1} ms\n\
             load: {} tenants, {} requests in {:.1} s: {} errors, {} cross-tenant leaks\n",
            self.model,
            self.machine,
            self.concurrent,
            self.max_tokens,
            self.engine_tok_s,
            self.http_tok_s,
            self.http_over_engine,
            self.ttft_p50_ms,
            self.ttft_p99_ms,
            self.load_tenants,
            self.load_requests,
            self.load_seconds,
            self.errors,
            self.cross_tenant_leaks,
        )
    }
}

fn prompt(t: usize) -> String {
    format!("user secret of bench {} . query secret of bench", secret(t))
}

/// A tenant's secret: 8 hex digits no other tenant's prompt holds.
fn secret(t: usize) -> String {
    let h = blake3::hash(format!("kframe bench secret {t}").as_bytes());
    h.to_hex()[..8].to_owned()
}

pub fn http(opts: &HttpBenchOptions, mut progress: impl FnMut(&str)) -> anyhow::Result<HttpReport> {
    let (dir, model_name, guard) = model_dir()?;
    let data = tempfile::tempdir()?;
    let master = MasterSecret::load_or_create(data.path())?;
    // The server's engine settings, as `kframe serve` sets them by default.
    let config = EngineConfig { max_batch: 64, kv_budget: 1 << 30, ..EngineConfig::default() };
    let params = SamplingParams { max_tokens: opts.max_tokens, ..Default::default() };

    progress(&format!("in-process engine: {} concurrent tenants", opts.concurrent));
    let engine_tok_s = {
        let generator = ModelBundle::load(&dir, DType::F32, &Device::Cpu)?;
        let prompts: Vec<Vec<u32>> =
            (0..opts.concurrent).map(|t| generator.encode(&prompt(t))).collect::<Result<_, _>>()?;
        let policies = Arc::new(PolicySet::new(PluginRuntime::new(Limits::default(), None)?));
        let engine = Engine::start(generator, master, policies, config);
        // Tenant ids and names as the server's registry gives them (ids from 1).
        let tenant = |t: usize| Tenant { id: t as u64 + 1, key_id: format!("b{t}"), epoch: 0, tier: 0 };
        let start = Instant::now();
        let streams: Vec<_> = prompts
            .into_iter()
            .enumerate()
            .map(|(t, prompt)| engine.submit(Submit { tenant: tenant(t), session: None, prompt, params }))
            .collect();
        let mut tokens = 0usize;
        for s in streams {
            tokens += drain(s)?;
        }
        let secs = start.elapsed().as_secs_f64();
        engine.shutdown();
        tokens as f64 / secs
    };

    progress("starting kframe serve");
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg("serve").args(["--addr", "127.0.0.1:0", "--max-connections", "4096"]);
    cmd.arg("--data-dir").arg(data.path());
    if guard.is_some() {
        cmd.arg("--model").arg(&dir.path);
    }
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
    let server = ChildGuard(&mut child);
    let mut line = String::new();
    let mut stdout = BufReader::new(server.0.stdout.take().expect("piped stdout"));
    stdout.read_line(&mut line)?;
    // Keep reading what the server prints, so it never writes into a closed pipe.
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .ok_or_else(|| anyhow::anyhow!("kframe serve did not start: {line:?}"))?
        .to_owned();
    let admin = std::fs::read_to_string(data.path().join(kframe_server::ADMIN_TOKEN_FILE))?.trim().to_owned();

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = rt.block_on(async {
        let tenants = opts.concurrent.max(opts.load_tenants);
        progress(&format!("creating {tenants} tenants"));
        let mut keys = Vec::with_capacity(tenants);
        for t in 0..tenants {
            let body = serde_json::json!({"name": format!("b{t}")}).to_string();
            let r = request(&addr, "POST", "/admin/tenants", &admin, &body).await?;
            let v: serde_json::Value = serde_json::from_slice(r.body())?;
            keys.push(v["api_key"].as_str().ok_or_else(|| anyhow::anyhow!("creating a tenant: {v}"))?.to_owned());
        }
        let keys = Arc::new(keys);

        progress(&format!("HTTP: {} concurrent streaming tenants", opts.concurrent));
        let start = Instant::now();
        let tasks: Vec<_> = (0..opts.concurrent)
            .map(|t| {
                let (addr, keys) = (addr.clone(), keys.clone());
                let body = serde_json::json!({"prompt": prompt(t), "max_tokens": opts.max_tokens, "temperature": 0, "stream": true});
                tokio::spawn(async move { stream(&addr, &keys[t], &body.to_string()).await })
            })
            .collect();
        let (mut tokens, mut ttfts) = (0usize, Vec::new());
        for task in tasks {
            let (n, ttft) = task.await??;
            tokens += n;
            ttfts.push(ttft.as_secs_f64() * 1e3);
        }
        let http_tok_s = tokens as f64 / start.elapsed().as_secs_f64();
        ttfts.sort_by(f64::total_cmp);
        let pct = |p: f64| ttfts[((ttfts.len() - 1) as f64 * p).round() as usize];

        progress(&format!("load: {} tenants x {} requests", opts.load_tenants, opts.requests_per_tenant));
        let start = Instant::now();
        let secrets: Arc<Vec<String>> = Arc::new((0..opts.load_tenants).map(secret).collect());
        let gate = Arc::new(tokio::sync::Semaphore::new(64));
        let tasks: Vec<_> = (0..opts.load_tenants * opts.requests_per_tenant)
            .map(|i| {
                let t = i % opts.load_tenants;
                let (addr, keys, secrets, gate) = (addr.clone(), keys.clone(), secrets.clone(), gate.clone());
                tokio::spawn(async move {
                    let _permit = gate.acquire().await;
                    let body = serde_json::json!({"prompt": prompt(t), "max_tokens": 8}).to_string();
                    let Ok(r) = request(&addr, "POST", "/v1/completions", &keys[t], &body).await else { return (1, 0) };
                    let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap_or_default();
                    let Some(text) = v["choices"][0]["text"].as_str() else { return (1, 0) };
                    let leaks = secrets.iter().enumerate().filter(|&(u, s)| u != t && text.contains(s.as_str())).count();
                    (usize::from(r.status != 200), leaks)
                })
            })
            .collect();
        let (mut errors, mut leaks) = (0, 0);
        for task in tasks {
            let (e, l) = task.await?;
            errors += e;
            leaks += l;
        }
        anyhow::Ok(HttpReport {
            model: model_name,
            machine: kframe_model::device::machine(),
            concurrent: opts.concurrent,
            max_tokens: opts.max_tokens,
            engine_tok_s,
            http_tok_s,
            http_over_engine: http_tok_s / engine_tok_s,
            ttft_p50_ms: pct(0.5),
            ttft_p99_ms: pct(0.99),
            load_tenants: opts.load_tenants,
            load_requests: opts.load_tenants * opts.requests_per_tenant,
            load_seconds: start.elapsed().as_secs_f64(),
            errors,
            cross_tenant_leaks: leaks,
        })
    })?;
    drop(server);
    Ok(report)
}

/// Kills the server when the bench ends, however it ends.
struct ChildGuard<'a>(&'a mut std::process::Child);

impl Drop for ChildGuard<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Response {
    status: u16,
    raw: Vec<u8>,
    body_at: usize,
}

impl Response {
    fn body(&self) -> &[u8] {
        &self.raw[self.body_at..]
    }
}

fn head(method: &str, path: &str, token: &str, body: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: kframe\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// One request with a whole (Content-Length) JSON answer.
async fn request(addr: &str, method: &str, path: &str, token: &str, body: &str) -> anyhow::Result<Response> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(head(method, path, token, body).as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(600), s.read_to_end(&mut raw)).await??;
    let body_at = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| anyhow::anyhow!("no response head"))? + 4;
    let status = std::str::from_utf8(&raw[..body_at])?
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no status"))?;
    Ok(Response { status, raw, body_at })
}

/// A streamed completion: its completion tokens (from the final usage) and the
/// time until the first event arrived.
async fn stream(addr: &str, key: &str, body: &str) -> anyhow::Result<(usize, Duration)> {
    let start = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(head("POST", "/v1/completions", key, body).as_bytes()).await?;
    let (mut raw, mut buf, mut first) = (Vec::new(), [0u8; 4096], None);
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if first.is_none() && raw.windows(6).any(|w| w == b"data: ") {
            first = Some(start.elapsed());
        }
    }
    let text = String::from_utf8_lossy(&raw);
    anyhow::ensure!(text.starts_with("HTTP/1.1 200"), "streamed request failed: {}", text.lines().next().unwrap_or(""));
    let usage = text
        .split("data: ")
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e.split("\r\n").next()?.trim()).ok())
        .filter_map(|v| v["usage"]["completion_tokens"].as_u64())
        .last()
        .ok_or_else(|| anyhow::anyhow!("no usage in the stream"))?;
    Ok((usage as usize, first.unwrap_or_else(|| start.elapsed())))
}
