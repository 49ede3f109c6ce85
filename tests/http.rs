//! `kframe serve` end to end: a real server process on 127.0.0.1, spoken to over
//! plain TCP with HTTP/1.1 (so that malformed requests can be sent too).

mod common;

use common::{fixture, generate, kframe, read_response, Resp, Server};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn streamed_text(r: &Resp, field: &str) -> String {
    let events = r.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{}", r.text());
    let mut text = String::new();
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        let choice = &v["choices"][0];
        let piece = if field == "text" { &choice["text"] } else { &choice["delta"]["content"] };
        text += piece.as_str().unwrap_or("");
    }
    text
}

#[test]
fn completions_and_chat_streamed_or_not_match_kframe_generate_for_the_same_tenant() {
    let f = fixture();
    let server = Server::start(&f.model, &f.data, &[]);
    let key = server.tenant("alice");
    let prompt = "The quick brown fox";
    let expected = generate(&f.model, &f.data, &server.key_id("alice"), 0, prompt, 12);

    let body = json!({"prompt": prompt, "max_tokens": 12, "temperature": 0});
    let r = server.post("/v1/completions", &key, &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["choices"][0]["text"], expected);
    assert_eq!(v["object"], "text_completion");
    let usage = &v["usage"];
    assert_eq!(
        usage["total_tokens"],
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );

    let mut body = body.clone();
    body["stream"] = json!(true);
    let r = server.post("/v1/completions", &key, &body);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert_eq!(streamed_text(&r, "text"), expected);

    // Chat renders the template (ChatML for a model without one) and completes it.
    let chat_prompt = "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n";
    let expected = generate(&f.model, &f.data, &server.key_id("alice"), 0, chat_prompt, 10);
    let body = json!({"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 10, "temperature": 0});
    let r = server.post("/v1/chat/completions", &key, &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["choices"][0]["message"]["content"], expected);
    let mut body = body.clone();
    body["stream"] = json!(true);
    let r = server.post("/v1/chat/completions", &key, &body);
    assert_eq!(streamed_text(&r, "content"), expected);

    // Another tenant's frame gives other text for the same prompt (a random model
    // amplifies any difference in attention).
    let bob = server.tenant("bob");
    let r = server.post("/v1/completions", &bob, &json!({"prompt": prompt, "max_tokens": 12, "temperature": 0}));
    assert_eq!(r.json()["choices"][0]["text"], generate(&f.model, &f.data, &server.key_id("bob"), 0, prompt, 12));

    let models = server.request("GET", "/v1/models", Some(&key), &[], b"").json();
    assert_eq!(models["data"][0]["id"], "model");
}

#[test]
fn a_stop_sequence_ends_the_text_before_it_in_both_modes() {
    let f = fixture();
    let server = Server::start(&f.model, &f.data, &[]);
    let key = server.tenant("alice");
    let body = json!({"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0});
    let full = server.post("/v1/completions", &key, &body).json()["choices"][0]["text"].as_str().unwrap().to_owned();
    // Stop at a piece of the text the model produces.
    let stop: String = full.chars().skip(full.chars().count() / 2).take(2).collect();
    let cut = &full[..full.find(&stop).unwrap()];
    let body = json!({"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0, "stop": stop});
    let v = server.post("/v1/completions", &key, &body).json();
    assert_eq!(v["choices"][0]["text"], cut);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let mut body = body.clone();
    body["stream"] = json!(true);
    assert_eq!(streamed_text(&server.post("/v1/completions", &key, &body), "text"), cut);
}

#[test]
fn sessions_continue_on_the_cache_and_another_tenants_session_is_a_404() {
    let f = fixture();
    let server = Server::start(&f.model, &f.data, &[]);
    let (alice, bob) = (server.tenant("alice"), server.tenant("bob"));
    let session = server.post("/v1/sessions", &alice, &json!({})).json()["id"].as_str().unwrap().to_owned();
    let first = "user: remember the code 4821 please.";
    let body = json!({"prompt": first, "max_tokens": 4, "temperature": 0, "session": session});
    let r = server.post("/v1/completions", &alice, &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let reply = r.json()["choices"][0]["text"].as_str().unwrap().to_owned();

    // The next turn extends the conversation; its prompt prefix comes from the cache.
    let second = format!("{first}{reply} user: what was it?");
    let r = server.request(
        "POST",
        "/v1/completions",
        Some(&alice),
        &[("X-Kframe-Session", &session)],
        json!({"prompt": second, "max_tokens": 6, "temperature": 0}).to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert!(v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["choices"][0]["text"], generate(&f.model, &f.data, &server.key_id("alice"), 0, &second, 6));

    // Bob cannot reach it, and cannot tell it from a session that never existed.
    let mut body = json!({"prompt": "hi", "max_tokens": 2, "session": session});
    let stolen = server.post("/v1/completions", &bob, &body);
    body["session"] = json!("sess-0000");
    let unknown = server.post("/v1/completions", &bob, &body);
    assert_eq!((stolen.status, unknown.status), (404, 404));
    assert_eq!(stolen.json()["error"]["code"], unknown.json()["error"]["code"]);
    assert_eq!(server.request("DELETE", &format!("/v1/sessions/{session}"), Some(&bob), &[], b"").status, 404);
    assert_eq!(server.request("DELETE", &format!("/v1/sessions/{session}"), Some(&alice), &[], b"").status, 200);
}

#[test]
fn a_hundred_tenants_in_parallel_each_recall_their_own_secret_from_their_session() {
    // The embedded model, which answers from its context.
    let data = tempfile::tempdir().unwrap();
    let server = std::sync::Arc::new(Server::start_on(None, data.path(), &[]));
    let names: Vec<&str> = include_str!("../host/model/src/corpus/names.txt")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    let secret = |i: usize| format!("{:04}", 1000 + i * 37);
    let tenants: Vec<(String, String, String)> = (0..100)
        .map(|i| {
            let key = server.tenant(&format!("t{i}"));
            let session = server.post("/v1/sessions", &key, &json!({})).json()["id"].as_str().unwrap().to_owned();
            (format!("t{i}"), key, session)
        })
        .collect();
    let tenants = std::sync::Arc::new(tenants);
    let workers: Vec<_> = (0..10)
        .map(|w| {
            let (server, tenants) = (server.clone(), tenants.clone());
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            std::thread::spawn(move || {
                let mut texts = Vec::new();
                for i in (w..100).step_by(10) {
                    let (tenant, key, session) = &tenants[i];
                    let name = &names[i % names.len()];
                    let stored = format!("a storm knocked down the old oak . user secret of {name} {} .", secret(i));
                    let body = json!({"prompt": stored, "max_tokens": 2, "temperature": 0, "session": session});
                    assert_eq!(server.post("/v1/completions", key, &body).status, 200);
                    let ask = format!("{stored} query secret of {name}");
                    let body = json!({"prompt": ask, "max_tokens": 1, "temperature": 0, "session": session});
                    let in_session = server.post("/v1/completions", key, &body).json();
                    assert!(in_session["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() > 0);
                    let text = in_session["choices"][0]["text"].as_str().unwrap().to_owned();
                    assert_eq!(text.trim(), secret(i), "{tenant} did not get its secret back");
                    texts.push((i, text));
                    // The cached context is this tenant's own: continuing it gives
                    // exactly what a fresh run of the whole prompt in its frame gives.
                    let fresh =
                        server.post("/v1/completions", key, &json!({"prompt": ask, "max_tokens": 1, "temperature": 0}));
                    assert_eq!(in_session["choices"][0]["text"], fresh.json()["choices"][0]["text"], "{tenant}");
                    // The neighbour's session is out of reach.
                    let other = &tenants[(i + 1) % 100].2;
                    let body = json!({"prompt": ask, "max_tokens": 1, "session": other});
                    assert_eq!(server.post("/v1/completions", key, &body).status, 404, "{tenant}");
                }
                texts
            })
        })
        .collect();
    let texts: Vec<(usize, String)> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    assert_eq!(texts.len(), 100);
    for (i, text) in &texts {
        for j in (0..100).filter(|j| j != i) {
            assert!(!text.contains(&secret(j)), "tenant t{i}'s answer {text:?} holds t{j}'s secret");
        }
    }
}

/// Runs examples/http/openai_client.py, which completes, chats and streams with
/// the official client. scripts/test.sh installs the client and sets
/// KFRAME_TEST_PYTHON; a plain `cargo test` without it says so and skips.
#[test]
fn the_official_openai_python_client_completes_chats_and_streams() {
    let Some(python) = std::env::var_os("KFRAME_TEST_PYTHON") else {
        eprintln!("skipped: KFRAME_TEST_PYTHON is not set (scripts/test.sh installs the openai client and sets it)");
        return;
    };
    let f = fixture();
    let server = Server::start(&f.model, &f.data, &[]);
    let key = server.tenant("alice");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/http/openai_client.py");
    let out = Command::new(python)
        .arg(script)
        .arg(format!("http://{}", server.addr))
        .env("KFRAME_API_KEY", &key)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    // The client's completion is the server's (and generate's) text for the prompt.
    let expected =
        generate(&f.model, &f.data, &server.key_id("alice"), 0, "user secret of rosa 8493 . query secret of rosa", 5);
    let line = format!("completion: {}", serde_json::to_string(&expected).unwrap());
    assert!(stdout.lines().any(|l| l == line), "expected {line:?} in {stdout}");
    for line in ["model: model", "chat: ", "stream: "] {
        assert!(stdout.contains(line), "missing {line:?} in {stdout}");
    }
}

#[test]
fn bad_requests_get_openai_style_errors_with_the_right_status() {
    let f = fixture();
    let server = Server::start(&f.model, &f.data, &["--max-body-bytes", "4096", "--max-prompt-tokens", "100"]);
    let key = server.tenant("alice");
    let json_ct = [("Content-Type", "application/json")];
    let long = "x".repeat(101);
    let cases: Vec<(Resp, u16)> = vec![
        (server.request("POST", "/v1/completions", None, &json_ct, b"{\"prompt\":\"hi\"}"), 401),
        (server.request("POST", "/v1/completions", Some("kf-wrong"), &json_ct, b"{\"prompt\":\"hi\"}"), 401),
        (server.request("POST", "/v1/completions", Some(&key), &json_ct, b"{\"prompt\":"), 400),
        (server.request("POST", "/v1/completions", Some(&key), &json_ct, b"{\"max_tokens\":3}"), 400),
        (server.post("/v1/completions", &key, &json!({"prompt": "hi", "max_tokens": 0})), 400),
        (server.post("/v1/completions", &key, &json!({"prompt": "hi", "temperature": 9})), 400),
        (server.post("/v1/completions", &key, &json!({"prompt": [999_999_999u32]})), 400),
        (server.post("/v1/completions", &key, &json!({"prompt": long})), 400),
        (server.post("/v1/completions", &key, &json!({"prompt": "hi", "max_tokens": 5000})), 400),
        (server.post("/v1/completions", &key, &json!({"prompt": "hi", "model": "gpt-4"})), 404),
        (server.post("/v1/chat/completions", &key, &json!({"messages": []})), 400),
        (server.request("POST", "/v1/completions", Some(&key), &json_ct, &vec![b' '; 10_000]), 413),
        (server.post("/admin/tenants", &key, &json!({"name": "mallory"})), 401),
        (server.post("/admin/tenants", &server.admin, &json!({"name": "no spaces"})), 400),
        (server.post("/admin/tenants", &server.admin, &json!({"name": "alice"})), 409),
        (server.request("GET", "/v1/completions", Some(&key), &[], b""), 405),
        (server.request("GET", "/nowhere", None, &[], b""), 404),
    ];
    for (i, (r, status)) in cases.iter().enumerate() {
        assert_eq!(r.status, *status, "case {i}: {}", r.text());
        let err = &r.json()["error"];
        assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()), "case {i}: {}", r.text());
        assert!(err["type"].is_string(), "case {i}");
    }
    // The server is unharmed.
    assert_eq!(server.post("/v1/completions", &key, &json!({"prompt": "hi", "max_tokens": 2})).status, 200);
    let metrics = server.request("GET", "/metrics", None, &[], b"").text();
    assert!(metrics.contains("kframe_http_responses_total{status=\"413\"} 1"), "{metrics}");
    assert!(metrics.contains("kframe_engine_tokens_generated_total"), "{metrics}");
}

#[test]
fn key_drop_delete_revokes_the_api_key_and_removes_the_sessions() {
    let f = fixture();
    let server = Server::start(&f.model, &f.data, &[]);
    let (alice, bob) = (server.tenant("alice"), server.tenant("bob"));
    let session = server.post("/v1/sessions", &alice, &json!({})).json()["id"].as_str().unwrap().to_owned();
    let r =
        server.post("/v1/completions", &alice, &json!({"prompt": "my secret", "max_tokens": 2, "session": session}));
    assert_eq!(r.status, 200);
    let r = server.request("DELETE", "/admin/tenants/alice", Some(&server.admin), &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["sessions_removed"], 1);
    assert_eq!(server.post("/v1/completions", &alice, &json!({"prompt": "hi", "max_tokens": 2})).status, 401);
    assert_eq!(server.post("/v1/completions", &bob, &json!({"prompt": "hi", "max_tokens": 2})).status, 200);
    let names: Vec<Value> = server.request("GET", "/admin/tenants", Some(&server.admin), &[], b"").json()["tenants"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(names.len(), 1);
    assert_eq!(names[0]["name"], "bob");
}

#[test]
fn rekey_over_the_admin_api_moves_a_live_session_to_the_new_epoch() {
    let f = fixture();
    let server = Server::start(&f.model, &f.data, &[]);
    let alice = server.tenant("alice");
    let session = server.post("/v1/sessions", &alice, &json!({})).json()["id"].as_str().unwrap().to_owned();
    let first = "user secret of alice 1234 .";
    let body = json!({"prompt": first, "max_tokens": 1, "temperature": 0, "session": session});
    assert_eq!(server.post("/v1/completions", &alice, &body).status, 200);
    let r = server.request("POST", "/admin/tenants/alice/rekey", Some(&server.admin), &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!((r.json()["epoch"].clone(), r.json()["sessions_rekeyed"].clone()), (json!(1), json!(1)));
    let ask = format!("{first} query secret of alice");
    let body = json!({"prompt": ask, "max_tokens": 5, "temperature": 0, "session": session});
    let v = server.post("/v1/completions", &alice, &body).json();
    assert!(v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["choices"][0]["text"], generate(&f.model, &f.data, &server.key_id("alice"), 1, &ask, 5));
}

#[test]
fn after_kill_9_under_load_every_tenant_authenticates_with_the_same_epoch() {
    let f = fixture();
    let mut keys = Vec::new();
    {
        let server = Server::start(&f.model, &f.data, &[]);
        for i in 0..20 {
            keys.push((format!("t{i}"), server.tenant(&format!("t{i}"))));
        }
        for (name, _) in &keys[..5] {
            let r = server.request("POST", &format!("/admin/tenants/{name}/rekey"), Some(&server.admin), &[], b"");
            assert_eq!(r.json()["epoch"], 1, "{}", r.text());
        }
        // Load in flight, then SIGKILL.
        let addr = server.addr.clone();
        let load: Vec<_> = keys
            .iter()
            .map(|(_, key)| {
                let (addr, key) = (addr.clone(), key.clone());
                std::thread::spawn(move || {
                    let body = json!({"prompt": "load", "max_tokens": 64}).to_string();
                    let req = format!(
                        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    if let Ok(mut s) = TcpStream::connect(addr) {
                        let _ = s.write_all(req.as_bytes());
                        let _ = s.read_to_end(&mut Vec::new());
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        drop(server); // SIGKILL
        for t in load {
            t.join().unwrap();
        }
    }
    let server = Server::start(&f.model, &f.data, &[]);
    let listed = server.request("GET", "/admin/tenants", Some(&server.admin), &[], b"").json();
    for (i, (name, key)) in keys.iter().enumerate() {
        let r = server.post("/v1/completions", key, &json!({"prompt": "still me", "max_tokens": 3, "temperature": 0}));
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        let epoch = listed["tenants"].as_array().unwrap().iter().find(|t| t["name"] == *name).unwrap()["epoch"].clone();
        assert_eq!(epoch, if i < 5 { 1 } else { 0 }, "{name}");
        // Same epoch, same frame: the same text as generate in that epoch.
        let e = epoch.as_u64().unwrap();
        assert_eq!(r.json()["choices"][0]["text"], generate(&f.model, &f.data, &server.key_id(name), e, "still me", 3));
    }
}

#[test]
fn sigterm_lets_an_in_flight_request_finish_then_the_server_exits() {
    let f = fixture();
    let mut server = Server::start(&f.model, &f.data, &[]);
    let key = server.tenant("alice");
    let addr = server.addr.clone();
    let inflight = std::thread::spawn(move || {
        let body = json!({"prompt": "a long answer", "max_tokens": 200, "stream": true}).to_string();
        let req = format!(
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        read_response(&mut s)
    });
    std::thread::sleep(Duration::from_millis(300));
    let term = Command::new("kill").args(["-TERM", &server.pid()]).status().unwrap();
    assert!(term.success());
    let r = inflight.join().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.events().last().map(String::as_str), Some("[DONE]"), "{}", r.text());
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    // A new connection finds nobody listening.
    assert!(TcpStream::connect(&server.addr).is_err());
}

#[test]
fn the_server_keeps_serving_when_whoever_started_it_closes_its_stdout() {
    let f = fixture();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kframe"))
        .args(["serve", "--model", f.model.to_str().unwrap(), "--data-dir", f.data.to_str().unwrap()])
        .args(["--addr", &addr])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The read end closes before the server prints its address.
    drop(child.stdout.take());
    let mut up = false;
    // Up to 120 s, as the other tests' reads: start-up compiles the shipped
    // components, which takes long on a loaded 2-core machine.
    for _ in 0..2400 {
        if TcpStream::connect(&addr).is_ok() {
            up = true;
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "the server exited: {:?}", child.try_wait());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(up, "the server never listened on {addr}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(child.try_wait().unwrap().is_none(), "the server died after printing to a closed stdout");
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut s).status, 200);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn requests_are_verified_by_the_corrective_layer_and_its_event_list_is_admin_only() {
    let f = fixture();
    let server = Server::start(&f.model, &f.data, &[]);
    let key = server.tenant("alice");
    let r = server.post("/v1/completions", &key, &json!({"prompt": "hello there", "max_tokens": 3}));
    assert_eq!(r.status, 200, "{}", r.text());
    let metrics = server.request("GET", "/metrics", None, &[], b"").text();
    let verified: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kframe_engine_blocks_verified_total "))
        .unwrap_or_else(|| panic!("{metrics}"))
        .parse()
        .unwrap();
    assert!(verified > 0.0, "{metrics}");
    assert!(metrics.contains("kframe_engine_isolation_events_total 0"), "{metrics}");
    let events = server.request("GET", "/admin/isolation-events?tenant=alice&limit=5", Some(&server.admin), &[], b"");
    assert_eq!(events.status, 200, "{}", events.text());
    assert_eq!(events.json(), json!({"events": [], "total": 0}));
    assert_eq!(server.request("GET", "/admin/isolation-events", Some(&key), &[], b"").status, 401);
    let bad = server.request("GET", "/admin/isolation-events?limit=many", Some(&server.admin), &[], b"");
    assert_eq!(bad.status, 400, "{}", bad.text());
}

fn shipped_plugin(name: &str) -> Vec<u8> {
    let path = kframe_policy::shipped(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run scripts/build-plugins.sh)", path.display()))
}

#[test]
fn a_policy_put_over_the_admin_api_is_swapped_in_and_a_broken_one_is_refused() {
    let f = fixture();
    let server = Server::start(&f.model, &f.data, &[]);
    let lfu = shipped_plugin("lfu");
    let r = server.request("PUT", "/admin/policies/eviction?name=lfu", Some(&server.admin), &[], &lfu);
    assert_eq!(r.status, 200, "{}", r.text());
    let broken = server.request("PUT", "/admin/policies/eviction?name=junk", Some(&server.admin), &[], b"\0asm junk");
    assert_eq!(broken.status, 400, "{}", broken.text());
    assert_eq!(broken.json()["error"]["code"], "invalid_component");
    let wrong_world = server.request("PUT", "/admin/policies/admission", Some(&server.admin), &[], &lfu);
    assert_eq!(wrong_world.status, 400, "{}", wrong_world.text());
    let listed = server.request("GET", "/admin/policies", Some(&server.admin), &[], b"").json();
    let eviction = listed["policies"].as_array().unwrap().iter().find(|p| p["kind"] == "eviction").unwrap().clone();
    assert_eq!(eviction["component"], "lfu");
    // The choice survives a restart.
    drop(server);
    let server = Server::start(&f.model, &f.data, &[]);
    let listed = server.request("GET", "/admin/policies", Some(&server.admin), &[], b"").json();
    let eviction = listed["policies"].as_array().unwrap().iter().find(|p| p["kind"] == "eviction").unwrap().clone();
    assert_eq!(eviction["component"], "lfu");
}

/// Tenants' ids whose sessions hold cache bytes, from the operator's metrics.
fn tenants_holding_cache(server: &Server) -> Vec<u64> {
    let metrics = server.request("GET", "/admin/metrics", Some(&server.admin), &[], b"").text();
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("kframe_engine_tenant_cache_bytes{tenant=\""))
        .filter_map(|l| l.split('"').next()?.parse().ok())
        .collect()
}

/// Four new tenants; the first holds a session used three times, the next two a
/// session used once each; then the fourth needs room. Returns the ids of the
/// four and whose session was evicted for it.
fn eviction_trace(server: &Server, names: [&str; 4]) -> (Vec<u64>, Vec<u64>) {
    let (mut ids, mut keys) = (Vec::new(), Vec::new());
    for name in names {
        let r = server.post("/admin/tenants", &server.admin, &json!({"name": name}));
        assert_eq!(r.status, 201, "{}", r.text());
        ids.push(r.json()["id"].as_u64().unwrap());
        keys.push(r.json()["api_key"].as_str().unwrap().to_owned());
    }
    let sessions: Vec<String> = keys
        .iter()
        .map(|k| server.post("/v1/sessions", k, &json!({})).json()["id"].as_str().unwrap().to_owned())
        .collect();
    let ask = |t: usize| {
        // 23 one-byte tokens: every session is the same size.
        let body = json!({"prompt": format!("{t} session prompt ......"), "max_tokens": 1, "session": sessions[t]});
        let r = server.post("/v1/completions", &keys[t], &body);
        assert_eq!(r.status, 200, "{}", r.text());
    };
    for t in [0, 0, 0, 1, 2] {
        ask(t);
    }
    let before = tenants_holding_cache(server);
    ask(3);
    let after = tenants_holding_cache(server);
    (ids, before.into_iter().filter(|t| !after.contains(t)).collect())
}

#[test]
fn an_eviction_policy_put_over_http_changes_the_next_eviction_without_a_restart() {
    let f = fixture();
    // Room for three and a half 24-token sessions: 2.25 KiB a token in this model with
    // the default f16 cache (2 KiB of K and V, plus 256 bytes for the default norm
    // padding of layer 0 by 32 dimensions).
    let budget = (3 * 24 + 12) * 2304;
    let server = Server::start(&f.model, &f.data, &["--kv-budget", &budget.to_string()]);
    let put = |name: &str, config: &str| {
        let path = format!("/admin/policies/eviction?name={name}&config={config}");
        let r = server.request("PUT", &path, Some(&server.admin), &[], &shipped_plugin(name));
        assert_eq!(r.status, 200, "{}", r.text());
    };
    put("lru", "");
    let (ids, evicted) = eviction_trace(&server, ["l0", "l1", "l2", "l3"]);
    assert_eq!(evicted, vec![ids[0]], "LRU evicts the least recently used session");
    for name in ["l0", "l1", "l2", "l3"] {
        let r = server.request("DELETE", &format!("/admin/tenants/{name}"), Some(&server.admin), &[], b"");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    put("lfu", "");
    let (ids, evicted) = eviction_trace(&server, ["f0", "f1", "f2", "f3"]);
    assert_eq!(evicted, vec![ids[1]], "LFU evicts the least used session, oldest first");

    // A component that answers with ids that do not exist: the built-in policy
    // decides instead, the failure is counted, and every request still succeeds.
    for name in ["f0", "f1", "f2", "f3"] {
        server.request("DELETE", &format!("/admin/tenants/{name}"), Some(&server.admin), &[], b"");
    }
    put("hostile", "unknown");
    let (_, evicted) = eviction_trace(&server, ["h0", "h1", "h2", "h3"]);
    assert_eq!(evicted.len(), 1, "the fallback made room");
    let metrics = server.request("GET", "/metrics", None, &[], b"").text();
    assert!(!metrics.contains("kframe_engine_plugin_failures_total 0\n"), "{metrics}");
    assert!(metrics.contains("kframe_engine_requests_failed_total 0\n"), "{metrics}");
}

mod hostile {
    use super::*;
    use proptest::prelude::*;

    fn path() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("/v1/completions".to_owned()),
            Just("/v1/chat/completions".to_owned()),
            Just("/v1/models".to_owned()),
            Just("/v1/sessions".to_owned()),
            Just("/admin/tenants".to_owned()),
            Just("/admin/tenants/alice/rekey".to_owned()),
            Just("/admin/policies/eviction".to_owned()),
            Just("/health".to_owned()),
            "/[a-z0-9/%._-]{0,40}",
        ]
    }

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
            "\\PC{0,30}".prop_map(Value::from),
            (0u32..2000).prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                prop::collection::btree_map("[a-z_]{1,12}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Request bodies that look like API calls, with every field free to be the
    /// wrong type or out of range (`max_tokens` kept small so that a case that
    /// happens to be valid stays quick).
    fn api_body() -> impl Strategy<Value = Vec<u8>> {
        let field = prop_oneof![
            Just("prompt"),
            Just("messages"),
            Just("max_tokens"),
            Just("temperature"),
            Just("top_p"),
            Just("stop"),
            Just("stream"),
            Just("session"),
            Just("model"),
            Just("n"),
            Just("seed"),
            Just("name"),
        ];
        let messages = prop::collection::vec(("[a-z]{0,9}", "\\PC{0,40}"), 0..4)
            .prop_map(|m| json!(m.into_iter().map(|(r, c)| json!({"role": r, "content": c})).collect::<Vec<_>>()));
        (
            prop::collection::vec((field, value()), 0..6),
            prop::option::of("\\PC{0,60}"),
            prop::option::of(messages),
            1u32..4,
        )
            .prop_map(|(fields, prompt, messages, max_tokens)| {
                let mut body = serde_json::Map::new();
                if let Some(p) = prompt {
                    body.insert("prompt".into(), json!(p));
                }
                if let Some(m) = messages {
                    body.insert("messages".into(), m);
                }
                for (k, v) in fields {
                    body.insert(k.into(), v);
                }
                if let Some(m) = body.get_mut("max_tokens") {
                    *m = json!(max_tokens);
                } else {
                    body.insert("max_tokens".into(), json!(max_tokens));
                }
                serde_json::to_vec(&body).unwrap()
            })
    }

    fn body() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            6 => api_body(),
            1 => prop::collection::vec(any::<u8>(), 0..200),
            1 => value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        ]
    }

    fn headers() -> impl Strategy<Value = Vec<(String, String)>> {
        prop::collection::vec(
            (
                prop_oneof![
                    Just("X-Kframe-Session".to_owned()),
                    Just("Content-Type".to_owned()),
                    Just("Accept".to_owned()),
                    "X-[A-Za-z-]{1,12}",
                ],
                "[ -~]{0,40}",
            ),
            0..4,
        )
    }

    #[test]
    fn hostile_bodies_and_headers_get_no_5xx_no_panic_and_no_dropped_connection() {
        let f = fixture();
        let server = Server::start(&f.model, &f.data, &[]);
        let key = server.tenant("alice");
        let cases = std::env::var("KFRAME_HOSTILE_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(10_000);
        let config = ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() };
        let tokens = [Some(key.clone()), Some(server.admin.clone()), Some("kf-nope".to_owned()), None];
        proptest!(config, |(method in prop_oneof![Just("GET"), Just("POST"), Just("PUT"), Just("DELETE")],
                           path in path(), who in 0usize..4, headers in headers(), body in body())| {
            // Keep the admin's hands off the tenant list, so that every case
            // meets the same server.
            let who = if path.starts_with("/admin") && method != "GET" && who == 1 { 2 } else { who };
            let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let r = server.request(method, &path, tokens[who].as_deref(), &headers, &body);
            prop_assert!(r.status < 500 || r.status == 503, "{method} {path}: {} {}", r.status, r.text());
        });
        // Still serving, and alice is intact.
        let r = server.post("/v1/completions", &key, &json!({"prompt": "hello", "max_tokens": 2}));
        assert_eq!(r.status, 200, "{}", r.text());
    }

    #[test]
    fn a_slow_client_does_not_block_others() {
        let f = fixture();
        let server = Server::start(&f.model, &f.data, &[]);
        let key = server.tenant("alice");
        // Ten connections that send half a request and stall.
        let stalled: Vec<TcpStream> = (0..10)
            .map(|_| {
                let mut s = TcpStream::connect(&server.addr).unwrap();
                s.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro").unwrap();
                s
            })
            .collect();
        let started = std::time::Instant::now();
        let r = server.post("/v1/completions", &key, &json!({"prompt": "hello", "max_tokens": 2}));
        assert_eq!(r.status, 200);
        assert!(started.elapsed() < Duration::from_secs(20), "served behind stalled clients");
        drop(stalled);
    }
}

#[test]
fn bench_http_prints_its_ratio_latencies_and_a_clean_load_as_json() {
    let out = kframe(&[
        "bench",
        "http",
        "--json",
        "--concurrent",
        "8",
        "--max-tokens",
        "4",
        "--load-tenants",
        "20",
        "--requests-per-tenant",
        "2",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    for field in ["http_over_engine", "engine_tok_s", "http_tok_s", "ttft_p50_ms", "ttft_p99_ms"] {
        assert!(v[field].as_f64().is_some_and(|x| x > 0.0), "{field}: {v}");
    }
    assert_eq!((v["errors"].as_u64(), v["cross_tenant_leaks"].as_u64()), (Some(0), Some(0)), "{v}");
    assert_eq!(v["load_requests"], 40);
}

/// The embedded model exported as Q8_0 GGUF and served from the file: each
/// tenant reads its own secret back over HTTP, the file's stem names the model,
/// and the same model quantized at load (`--quantize q8_0`) writes the same text.
#[test]
fn a_quantized_gguf_file_serves_over_http_and_matches_in_situ_quantization() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("kframe-tiny-q8_0.gguf");
    let out = kframe(&["export-gguf", "--type", "q8_0", "--out", gguf.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let served = |model: Option<&Path>, extra: &[&str], data: &str| {
        let server = Server::start_on(model, &tmp.path().join(data), extra);
        let mut texts = Vec::new();
        for (tenant, name, code) in [("alice", "rosa", "8493"), ("bob", "ines", "2716")] {
            let key = server.tenant(tenant);
            let prompt = format!("user secret of {name} {code} . query secret of {name}");
            let body = json!({"prompt": prompt, "max_tokens": 1, "temperature": 0});
            let r = server.post("/v1/completions", &key, &body);
            assert_eq!(r.status, 200, "{}", r.text());
            let text = r.json()["choices"][0]["text"].as_str().unwrap().to_owned();
            assert_eq!(text.trim(), code, "{tenant}");
            texts.push(text);
        }
        let models = server.request("GET", "/v1/models", Some(&server.tenant("carol")), &[], b"").json();
        (texts, models["data"][0]["id"].as_str().unwrap().to_owned())
    };
    let (from_file, id) = served(Some(&gguf), &[], "file");
    assert_eq!(id, "kframe-tiny-q8_0");
    let (in_situ, _) = served(None, &["--quantize", "q8_0"], "isq");
    assert_eq!(from_file, in_situ);
}
