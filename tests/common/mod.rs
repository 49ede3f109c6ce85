//! What the end-to-end tests share: the kframe binary, a random model directory,
//! a real `kframe serve` on 127.0.0.1 spoken to over plain TCP with HTTP/1.1 (so
//! that malformed requests can be sent too), and its responses.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

pub fn kframe(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kframe")).args(args).output().expect("the kframe binary runs")
}

pub fn synth_model(dir: &Path) {
    let out = kframe(&["synth-model", "--out", dir.to_str().unwrap(), "--seed", "5"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

pub struct Server {
    pub child: Child,
    pub addr: String,
    pub admin: String,
    _stdout: BufReader<ChildStdout>,
}

impl Server {
    pub fn start(model: &Path, data: &Path, extra: &[&str]) -> Self {
        Self::start_on(Some(model), data, extra)
    }

    /// `model` None: the embedded model.
    pub fn start_on(model: Option<&Path>, data: &Path, extra: &[&str]) -> Self {
        Self::start_with_env(model, data, extra, &[])
    }

    /// [`Self::start_on`] with extra environment variables for the server.
    pub fn start_with_env(model: Option<&Path>, data: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kframe"));
        cmd.envs(env.iter().copied());
        cmd.args(["serve", "--data-dir", data.to_str().unwrap()]);
        if let Some(model) = model {
            cmd.args(["--model", model.to_str().unwrap()]);
        }
        // A fixed address (a replica behind a router) replaces the kernel's pick.
        if !extra.contains(&"--addr") {
            cmd.args(["--addr", "127.0.0.1:0"]);
        }
        let mut child = cmd.args(extra).stdout(Stdio::piped()).spawn().expect("kframe serve starts");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_owned();
        let secrets = extra.iter().position(|a| *a == "--secrets-dir").map_or(data, |i| Path::new(extra[i + 1]));
        let admin = std::fs::read_to_string(secrets.join("admin.token")).unwrap().trim().to_owned();
        Self { child, addr, admin, _stdout: stdout }
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Resp {
        request_to(&self.addr, method, path, token, headers, body)
    }

    pub fn post(&self, path: &str, token: &str, body: &Value) -> Resp {
        post_to(&self.addr, path, token, body)
    }

    /// Creates a tenant; returns its api key.
    pub fn tenant(&self, name: &str) -> String {
        let r = self.post("/admin/tenants", &self.admin, &json!({"name": name}));
        assert_eq!(r.status, 201, "{}", r.text());
        r.json()["api_key"].as_str().unwrap().to_owned()
    }

    /// The frame identity of tenant `name`, as the admin API lists it: what
    /// `kframe generate --tenant` takes to run in the same frame.
    pub fn key_id(&self, name: &str) -> String {
        let listed = self.request("GET", "/admin/tenants", Some(&self.admin), &[], b"").json();
        let tenant = listed["tenants"].as_array().unwrap().iter().find(|t| t["name"] == name).cloned();
        tenant.unwrap_or_else(|| panic!("no tenant {name} in {listed}"))["key_id"].as_str().unwrap().to_owned()
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request to `addr` (a replica, or a router in front of some).
pub fn request_to(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        head += &format!("Authorization: Bearer {t}\r\n");
    }
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += &format!("Content-Length: {}\r\n\r\n", body.len());
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    read_response(&mut s)
}

pub fn post_to(addr: &str, path: &str, token: &str, body: &Value) -> Resp {
    request_to(addr, "POST", path, Some(token), &[("Content-Type", "application/json")], body.to_string().as_bytes())
}

pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The `data:` payloads of a server-sent event stream.
    pub fn events(&self) -> Vec<String> {
        self.text().split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(str::to_owned).collect()
    }
}

pub fn read_response(s: &mut TcpStream) -> Resp {
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a complete response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned())).collect();
    let mut body = raw[split + 4..].to_vec();
    if headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked")) {
        body = dechunk(&body);
    }
    Resp { status, headers, body }
}

pub fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").expect("a chunk size line");
        let size = usize::from_str_radix(std::str::from_utf8(&data[..line_end]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[line_end + 2..line_end + 2 + size]);
        data = &data[line_end + 2 + size + 2..];
    }
}

pub fn generate(model: &Path, data: &Path, tenant: &str, epoch: u64, prompt: &str, max_tokens: usize) -> String {
    let out = kframe(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--tenant",
        tenant,
        "--epoch",
        &epoch.to_string(),
        "--prompt",
        prompt,
        "--max-tokens",
        &max_tokens.to_string(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    text.strip_suffix('\n').unwrap().to_owned()
}

pub struct Fixture {
    pub _tmp: tempfile::TempDir,
    pub model: PathBuf,
    pub data: PathBuf,
}

pub fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = (tmp.path().join("model"), tmp.path().join("data"));
    synth_model(&model);
    Fixture { _tmp: tmp, model, data }
}
