//! Running llama.cpp's own tools, built by `scripts/bench-peer.sh`: its
//! `llama-batched-bench` for speed (llama.cpp's standard measure of prompt and
//! batched generation), and `llama-server` for greedy tokens from token-id prompts
//! (its `/completion` takes a prompt as token ids and returns the ids it chose).

use anyhow::Context;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One row of `llama-batched-bench --output-format jsonl`: `pl` sequences, each a
/// `pp`-token prompt (prefilled in one batch) then `tg` tokens decoded together.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct BatchedRow {
    pub pp: usize,
    pub tg: usize,
    pub pl: usize,
    /// Seconds for the prompts, the generation and both.
    pub t_pp: f64,
    pub t_tg: f64,
    pub t: f64,
}

impl BatchedRow {
    /// Generated tokens over the whole time, prompts included: what a client of a
    /// batch sees, and how kframe's side is measured.
    pub fn generated_per_s(&self) -> f64 {
        (self.pl * self.tg) as f64 / self.t
    }

    pub fn prompt_per_s(&self) -> f64 {
        (self.pl * self.pp) as f64 / self.t_pp
    }
}

/// The rows in llama-batched-bench's output; its log lines around them are skipped.
pub fn parse_batched(output: &str) -> anyhow::Result<Vec<BatchedRow>> {
    let rows: Vec<BatchedRow> = output
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with('{') && l.contains("\"t_tg\""))
        .map(|l| serde_json::from_str(l).with_context(|| format!("unreadable llama-batched-bench row: {l}")))
        .collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(!rows.is_empty(), "llama-batched-bench printed no result rows");
    Ok(rows)
}

/// The ids in a llama-server `/completion` answer asked with `return_tokens`.
pub fn parse_completion_tokens(body: &str) -> anyhow::Result<Vec<u32>> {
    let v: serde_json::Value = serde_json::from_str(body).context("llama-server answered no JSON")?;
    let tokens = v["tokens"].as_array().with_context(|| format!("no \"tokens\" in llama-server's answer: {body}"))?;
    tokens
        .iter()
        .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()).context("a token id that is not a u32"))
        .collect()
}

/// A llama.cpp build: the folder with its binaries.
pub struct LlamaCpp {
    bin: PathBuf,
    pub threads: usize,
}

impl LlamaCpp {
    pub fn new(bin: &Path, threads: usize) -> anyhow::Result<Self> {
        for tool in ["llama-batched-bench", "llama-server"] {
            anyhow::ensure!(
                bin.join(tool).is_file(),
                "no {tool} in {} (scripts/bench-peer.sh builds llama.cpp there)",
                bin.display()
            );
        }
        Ok(Self { bin: bin.to_owned(), threads })
    }

    /// `pl` sequences of `pp` prompt tokens and `tg` generated ones, for each `pl`.
    pub fn batched_bench(&self, model: &Path, pp: usize, tg: usize, pl: &[usize]) -> anyhow::Result<Vec<BatchedRow>> {
        let pl_list = pl.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
        let most = pl.iter().max().copied().unwrap_or(1);
        // A row whose sequences do not fit the context is skipped without a word;
        // llama.cpp also rounds the context to its own multiples: ask for room.
        let context = (most * (pp + tg)).next_multiple_of(1024).max(4096);
        let mut cmd = Command::new(self.bin.join("llama-batched-bench"));
        cmd.arg("-m")
            .arg(model)
            .args(["-c", &context.to_string(), "-b", "2048", "-ub", "512"])
            .args(["-npp", &pp.to_string(), "-ntg", &tg.to_string(), "-npl", &pl_list])
            .args(["-t", &self.threads.to_string(), "--output-format", "jsonl"])
            .stdin(Stdio::null());
        let out = cmd.output().context("running llama-batched-bench")?;
        let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let failed = || format!("{cmd:?} ({}) printed:\n{}", out.status, tail(&text));
        anyhow::ensure!(out.status.success(), "llama-batched-bench failed: {}", failed());
        let rows = parse_batched(&text).with_context(failed)?;
        for want in pl {
            anyhow::ensure!(rows.iter().any(|r| r.pl == *want), "no row for {want} sequences: {}", failed());
        }
        Ok(rows)
    }

    /// Greedy continuations of token-id `prompts`, `n` tokens each (end of
    /// sequence ignored, so that every engine runs the same number of steps).
    pub fn greedy(&self, model: &Path, prompts: &[Vec<u32>], n: usize) -> anyhow::Result<Vec<Vec<u32>>> {
        let server = Server::start(&self.bin.join("llama-server"), model, self.threads)?;
        prompts
            .iter()
            .map(|p| {
                let body = serde_json::json!({
                    "prompt": p, "n_predict": n, "temperature": 0.0, "top_k": 1, "samplers": ["top_k"],
                    "ignore_eos": true, "return_tokens": true, "cache_prompt": false,
                });
                let answer = server.post("/completion", &body.to_string())?;
                parse_completion_tokens(&answer)
            })
            .collect()
    }
}

/// llama-server on a free loopback port, stopped when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(bin: &Path, model: &Path, threads: usize) -> anyhow::Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new(bin)
            .arg("-m")
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "-t", &threads.to_string()])
            .args(["-np", "1", "-c", "1024", "--no-webui"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting llama-server")?;
        let mut server = Self { child, addr: format!("127.0.0.1:{port}") };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = server.child.try_wait()? {
                anyhow::bail!("llama-server exited before it served ({status})");
            }
            if matches!(server.request("GET", "/health", ""), Ok((200, _))) {
                return Ok(server);
            }
            anyhow::ensure!(Instant::now() < deadline, "llama-server not healthy within 60 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn post(&self, path: &str, body: &str) -> anyhow::Result<String> {
        let (status, text) = self.request("POST", path, body)?;
        anyhow::ensure!(status == 200, "llama-server {path}: {status} {text}");
        Ok(text)
    }

    /// One HTTP/1.1 request with `Connection: close`; the status and the body.
    fn request(&self, method: &str, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
        let mut s = TcpStream::connect(&self.addr)?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        )?;
        let mut raw = String::new();
        s.read_to_string(&mut raw)?;
        let (head, rest) = raw.split_once("\r\n\r\n").context("no HTTP head from llama-server")?;
        let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).context("no HTTP status")?;
        // llama-server answers with Content-Length, never chunked, for these.
        Ok((status, rest.to_owned()))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What llama-batched-bench 0.3.36's vendored llama.cpp prints with
    /// `--output-format jsonl`, log lines and all.
    const OUTPUT: &str = r#"llama_model_loader: loaded meta data with 24 key-value pairs
main: n_kv_max = 2576, n_batch = 2048
{"n_kv_max": 2576, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, "n_gpu_layers": -1, "n_threads": 2, "n_threads_batch": 2, "pp": 16, "tg": 64, "pl": 1, "n_kv": 80, "t_pp": 0.001800, "speed_pp": 8888.888672, "t_tg": 0.024000, "speed_tg": 2666.666748, "t": 0.025800, "speed": 3100.775146}
{"n_kv_max": 2576, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, "n_gpu_layers": -1, "n_threads": 2, "n_threads_batch": 2, "pp": 16, "tg": 64, "pl": 32, "n_kv": 2560, "t_pp": 0.040000, "speed_pp": 12800.000000, "t_tg": 0.160000, "speed_tg": 12800.000000, "t": 0.200000, "speed": 12800.000000}

llama_perf_context_print:        load time =      12.06 ms
"#;

    #[test]
    fn batched_bench_rows_are_read_and_generated_tokens_count_the_prompt_time() {
        let rows = parse_batched(OUTPUT).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[1].pp, rows[1].tg, rows[1].pl), (16, 64, 32));
        // 32 * 64 tokens in 0.2 s, not the 0.16 s of generation alone.
        assert!((rows[1].generated_per_s() - 10_240.0).abs() < 1e-6);
        assert!((rows[0].prompt_per_s() - 16.0 / 0.0018).abs() < 1e-3);
    }

    #[test]
    fn output_without_result_rows_or_with_a_broken_row_is_an_error() {
        assert!(parse_batched("main: error: failed to load model\n").is_err());
        let broken = "{\"pp\": 16, \"tg\": 64, \"pl\": 1, \"t_tg\": }";
        assert!(parse_batched(broken).is_err());
    }

    #[test]
    fn completion_tokens_are_read_from_return_tokens() {
        let body = r#"{"content": " the cat", "tokens": [279, 8251], "stop": true, "tokens_predicted": 2}"#;
        assert_eq!(parse_completion_tokens(body).unwrap(), vec![279, 8251]);
        assert!(parse_completion_tokens(r#"{"content": "x"}"#).is_err());
        assert!(parse_completion_tokens(r#"{"tokens": [-1]}"#).is_err());
    }
}
