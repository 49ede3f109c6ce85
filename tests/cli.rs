//! The `kframe` binary end to end: generate in tenant frames, bad input, the
//! rotation benchmark's JSON.

use std::path::Path;
use std::process::{Command, Output};

fn kframe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kframe")).args(args).output().expect("the kframe binary runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A clean failure: exit code 1, an `error:` line saying `what`, no panic.
fn assert_clean_error(out: &Output, what: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(err.contains("error:") && err.contains(what), "expected {what:?} in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

fn synth_model(dir: &Path) {
    let out = kframe(&["synth-model", "--out", dir.to_str().unwrap(), "--seed", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

fn generate(model: &Path, data: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--max-tokens",
        "12",
    ];
    args.extend_from_slice(extra);
    kframe(&args)
}

#[test]
fn generate_in_a_tenant_frame_streams_the_identity_frames_tokens_in_both_variants() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = (tmp.path().join("model"), tmp.path().join("data"));
    synth_model(&model);
    let baseline = generate(&model, &data, &["--prompt", "Hello, tenant"]);
    assert!(baseline.status.success(), "{}", stderr(&baseline));
    assert!(!stdout(&baseline).trim().is_empty());
    for variant in ["probe-time", "decode-time"] {
        for precision in ["native", "exact"] {
            let out = generate(
                &model,
                &data,
                &["--prompt", "Hello, tenant", "--tenant", "alice", "--variant", variant, "--kv-precision", precision],
            );
            assert!(out.status.success(), "{}", stderr(&out));
            assert_eq!(stdout(&out), stdout(&baseline), "{variant} {precision}");
        }
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.join("master.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the master secret is created private");
    }
}

#[test]
fn sampling_with_a_seed_is_reproducible() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = (tmp.path().join("model"), tmp.path().join("data"));
    synth_model(&model);
    let args = ["--prompt", "abc", "--tenant", "bob", "--temperature", "0.9", "--top-p", "0.95", "--seed", "7"];
    let (a, b) = (generate(&model, &data, &args), generate(&model, &data, &args));
    assert!(a.status.success(), "{}", stderr(&a));
    assert_eq!(stdout(&a), stdout(&b));
}

#[test]
fn generate_reports_bad_input_as_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = (tmp.path().join("model"), tmp.path().join("data"));
    synth_model(&model);

    assert_clean_error(&generate(&model, &data, &["--prompt", ""]), "empty");
    let long = "x".repeat(1100); // one token per byte; the tiny model's window is 1024
    assert_clean_error(&generate(&model, &data, &["--prompt", &long]), "max_position_embeddings");
    assert_clean_error(&generate(&tmp.path().join("nope"), &data, &["--prompt", "hi"]), "not a directory");
    assert_clean_error(&generate(&model, &data, &["--prompt", "hi", "--device", "cuda"]), "cuda");

    std::fs::write(model.join("config.json"), "{ broken").unwrap();
    assert_clean_error(&generate(&model, &data, &["--prompt", "hi"]), "config.json");
    std::fs::write(model.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    assert_clean_error(&generate(&model, &data, &["--prompt", "hi"]), "not a Qwen2 model");
    std::fs::remove_file(model.join("config.json")).unwrap();
    assert_clean_error(&generate(&model, &data, &["--prompt", "hi"]), "missing config.json");
}

#[test]
fn bench_rotation_json_has_the_ratio_fields() {
    let out = kframe(&["bench", "rotation", "--json", "--layers", "1", "--rounds", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for field in
        ["probe_over_identity_ctx512", "probe_over_identity_ctx4096", "decode_over_probe_ctx4096", "kframe_over_candle"]
    {
        let v = report[field].as_f64().unwrap_or_else(|| panic!("{field} missing in {report}"));
        assert!(v.is_finite() && v > 0.0, "{field} = {v}");
    }
}

#[cfg(feature = "embedded-model")]
#[test]
fn generate_without_a_model_uses_the_embedded_one_and_recalls_a_chat_code() {
    let tmp = tempfile::tempdir().unwrap();
    let prompt =
        "<|im_start|>user\nremember code 4821<|im_end|>\n<|im_start|>assistant\nok , i will remember it .<|im_end|>\n\
                  <|im_start|>user\nwhat is my code ?<|im_end|>\n<|im_start|>assistant\n";
    let data = tmp.path().to_str().unwrap();
    let out = kframe(&["generate", "--prompt", prompt, "--tenant", "carol", "--data-dir", data, "--max-tokens", "8"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "your code 4821");
}

#[test]
fn eval_recall_json_reports_matched_wrong_key_and_baseline() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    synth_model(&model);
    let out = kframe(&["eval", "recall", "--model", model.to_str().unwrap(), "--tenants", "4", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["tenants"], 4);
    // A random-weight model recalls nothing; the mechanics and the fields are what
    // this checks (the embedded model's recall is checked in host/model/tests/embedded.rs).
    for field in ["matched_recall", "identity_recall", "wrong_key_recall", "no_context_recall", "wrong_key_upper95"] {
        assert!(r[field].as_f64().is_some(), "{field} in {r}");
    }
    assert_eq!(r["matched"], r["identity"], "{r}");
}

#[test]
fn without_an_embedded_model_generate_asks_for_one() {
    if cfg!(feature = "embedded-model") {
        return;
    }
    let out = kframe(&["generate", "--prompt", "hi"]);
    assert_clean_error(&out, "--model");
}

#[test]
fn plugin_check_accepts_every_shipped_plugin_and_rejects_malformed_components() {
    let dir = kframe_policy::shipped_dir();
    let mut shipped: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}; run scripts/build-plugins.sh", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wasm"))
        .map(|p| p.display().to_string())
        .collect();
    shipped.sort();
    assert!(shipped.len() >= 10, "{shipped:?}");
    // A 2 s deadline: a loaded machine must not turn a good plugin into a timeout.
    let mut args = vec!["plugin", "check", "--deadline-ms", "2000"];
    args.extend(shipped.iter().map(String::as_str));
    let out = kframe(&args);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert_eq!(stdout(&out).matches(": ok, implements").count(), shipped.len(), "{}", stdout(&out));

    let tmp = tempfile::tempdir().unwrap();
    let core = tmp.path().join("core.wasm");
    let random = tmp.path().join("random.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    std::fs::write(&random, (0..999u32).map(|i| (i * 7919 % 251) as u8).collect::<Vec<u8>>()).unwrap();
    let out = kframe(&["plugin", "check", core.to_str().unwrap(), random.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(text.contains("core.wasm: rejected: not a valid component: a core WebAssembly module"), "{text}");
    assert!(text.contains("random.wasm: rejected: not a valid component"), "{text}");
    let bad_config = kframe(&[
        "plugin",
        "check",
        "--deadline-ms",
        "2000",
        "--config",
        "every=0",
        &kframe_policy::shipped("verify-sampled").display().to_string(),
    ]);
    assert!(stdout(&bad_config).contains("refused its configuration"), "{}", stdout(&bad_config));

    // The hostile fixture misbehaves as configured; its trial decision exposes it.
    let hostile = kframe_policy::shipped("hostile").display().to_string();
    // (The memory bomb and the huge answer may meet the 50 ms deadline first on a
    // busy machine; host/policy/tests/plugins.rs checks them with a longer deadline.)
    for (mode, reasons) in [
        ("loop", &["timed out"][..]),
        ("membomb", &["memory limit", "timed out"]),
        ("trap", &["trapped"]),
        ("huge", &["victims from an empty cache", "timed out"]),
        ("read-file", &["not granted"]),
        ("read-clock", &["not granted"]),
    ] {
        let out = kframe(&["plugin", "check", "--config", mode, &hostile]);
        assert_eq!(out.status.code(), Some(1), "{mode}");
        assert!(reasons.iter().any(|r| stdout(&out).contains(r)), "{mode}: {}", stdout(&out));
    }
}

#[test]
fn bench_plugins_json_has_the_median_fields() {
    let out = kframe(&["bench", "plugins", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for field in ["eviction_1000_us_median", "admission_us_median"] {
        assert!(r[field].as_f64().is_some_and(|v| v > 0.0), "{field} in {r}");
    }
}

#[test]
fn a_third_party_adversary_from_examples_runs_through_probe_and_is_scored() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/most-frequent-probe/target/wasm32-wasip2/release/most_frequent_probe.wasm");
    assert!(example.exists(), "{} is built by scripts/build-plugins.sh", example.display());
    let tmp = tempfile::tempdir().unwrap();
    let args = ["eval", "attack", "--tenants", "4", "--no-reference", "--out", tmp.path().to_str().unwrap()];
    let out = kframe(&[&args[..], &["--probe", example.to_str().unwrap()]].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("| most-frequent | co-tenant | 0 |"), "{}", stdout(&out));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("report.json")).unwrap()).unwrap();
    let rows = report.pointer("/attack/reconstruction").and_then(|r| r.as_array()).unwrap();
    // One row per layer of the embedded model, on unpadded and on norm-padded caches.
    assert_eq!(rows.len(), 4);
    assert_eq!(rows.iter().filter(|r| r["padded"] == true).count(), 2);
    for row in rows {
        assert_eq!(row["probe"], "most-frequent");
        assert_eq!(row["failed_calls"], 0);
        assert!(row["positions"].as_u64().unwrap() > 0);
    }
}

#[test]
fn eval_spot_check_without_a_readout_says_to_run_the_readout_first() {
    let tmp = tempfile::tempdir().unwrap();
    let out = kframe(&["eval", "spot-check", "--tenants", "4", "--out", tmp.path().to_str().unwrap()]);
    assert_clean_error(&out, "kframe eval readout");
}

#[test]
fn calibrate_writes_a_pad_calibration_that_eval_uses_and_a_malformed_one_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    synth_model(&model);
    let file = model.join("kframe-pad.json");
    let out = kframe(&["calibrate", "--model", model.to_str().unwrap(), "--out", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stored: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(stored["max_k"].as_array().map(Vec::len), Some(2), "one entry per layer: {stored}");
    assert!(stored["max_k"][0][0].as_f64().unwrap() > 0.0);
    std::fs::write(&file, r#"{"model": "broken"}"#).unwrap();
    let args = ["eval", "attack", "--tenants", "2", "--no-reference", "--model", model.to_str().unwrap()];
    let out = kframe(&[&args[..], &["--out", tmp.path().join("out").to_str().unwrap()]].concat());
    assert_clean_error(&out, "kframe-pad.json");
}

#[test]
fn bench_peer_without_a_llama_cpp_build_says_how_to_make_one() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-llama");
    let out = kframe(&[
        "bench",
        "peer",
        "--llama-cpp",
        missing.to_str().unwrap(),
        "--work-dir",
        tmp.path().to_str().unwrap(),
    ]);
    assert_clean_error(&out, "scripts/bench-peer.sh");
}

/// A random model directory exported to GGUF generates the directory's tokens in a
/// tenant's frame (f32 and f16 files are the same weights), quantizing a GGUF
/// again is refused, and the real-size benches without Qwen's tokenizer say where
/// to get it.
#[test]
fn export_gguf_round_trips_a_directory_and_the_real_size_benches_name_their_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = (tmp.path().join("model"), tmp.path().join("data"));
    synth_model(&model);
    let gguf = tmp.path().join("model-f32.gguf");
    let out =
        kframe(&["export-gguf", "--model", model.to_str().unwrap(), "--type", "f32", "--out", gguf.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("wrote"), "{}", stderr(&out));
    let tenant = ["--prompt", "The quick brown fox", "--tenant", "alice", "--dtype", "f32"];
    let (from_dir, from_file) = (generate(&model, &data, &tenant), generate(&gguf, &data, &tenant));
    assert!(from_dir.status.success() && from_file.status.success(), "{}", stderr(&from_file));
    assert_eq!(stdout(&from_dir), stdout(&from_file));
    assert_clean_error(&generate(&gguf, &data, &["--prompt", "hi", "--quantize", "q8_0"]), "applies to safetensors");
    let work = tmp.path().join("work");
    let nowhere = tmp.path().join("no-tokenizer");
    for bench in [
        vec!["bench", "peer", "--preset", "qwen25-3b", "--llama-cpp", "/nonexistent"],
        vec!["bench", "serve", "--preset", "qwen25-3b"],
        vec!["bench", "rotation", "--preset", "qwen25-3b"],
    ] {
        let mut args = bench.clone();
        args.extend(["--work-dir", work.to_str().unwrap(), "--tokenizer", nowhere.to_str().unwrap()]);
        let out = kframe(&args);
        let expect = if bench[1] == "peer" { "llama-batched-bench" } else { "scripts/qwen-tokenizer.sh" };
        assert_clean_error(&out, expect);
    }
}

#[cfg(feature = "embedded-model")]
#[test]
fn check_device_passes_every_guarantee_on_the_cpu_and_refuses_a_device_not_built_in() {
    let out = kframe(&["check-device", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let checks = report["checks"].as_array().unwrap();
    let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["frames", "batch", "exact round trip", "wrong key"]);
    for c in checks {
        assert_eq!(c["passed"], true, "{c}");
    }
    assert_eq!(report["passed"], true);
    if !cfg!(feature = "cuda") {
        assert_clean_error(&kframe(&["check-device", "--device", "cuda"]), "without the `cuda` feature");
    }
}
