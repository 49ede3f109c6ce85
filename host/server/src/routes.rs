//! One function per endpoint. `handle` routes, counts the response and turns
//! every error into its OpenAI-style JSON; nothing here panics on client input.

use crate::app::App;
use crate::completion::{self, JsonSink, SseSink};
use crate::http::{bearer, engine_error, json_response, parse_json, read_body, text_response, ApiError, Body};
use crate::openai::{ChatRequest, CompletionRequest, Endpoint, Prompt, Reply, Sampling};
use crate::sync::frame;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{header, Method, Request, Response, StatusCode};
use kframe_engine::{EngineError, Event, Submit};
use kframe_model::generate::SamplingParams;
use kframe_policy::PolicyKind;
use kframe_registry::{PolicyRecord, RegistryError, TenantRecord};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

pub async fn handle(app: Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let mut resp = match route(&app, req).await {
        Ok(resp) => resp,
        Err(e) => e.response(),
    };
    app.count_response(resp.status().as_u16());
    if let Ok(name) = HeaderValue::from_str(&app.replica.name) {
        resp.headers_mut().insert("x-kframe-replica", name);
    }
    resp
}

async fn route(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let method = req.method().clone();
    if app.draining() && segments.first() != Some(&"health") {
        return Err(ApiError::unavailable("the server is shutting down"));
    }
    match (method, segments.as_slice()) {
        (Method::GET, ["health"]) => Ok(health(app)),
        (Method::GET, ["metrics"]) => Ok(metrics(app, Scope::Public)),
        (Method::GET, ["admin", "metrics"]) => {
            admin(app, &req)?;
            Ok(metrics(app, Scope::Admin))
        }
        (Method::GET, ["v1", "models"]) => {
            tenant_or_admin(app, &req)?;
            Ok(models(app))
        }
        (Method::POST, ["v1", "completions"]) => generate(app, req, Endpoint::Completions).await,
        (Method::POST, ["v1", "chat", "completions"]) => generate(app, req, Endpoint::Chat).await,
        (Method::POST, ["v1", "sessions"]) => new_session(app, &req),
        (Method::DELETE, ["v1", "sessions", id]) => end_session(app, &req, id).await,
        (Method::POST, ["admin", "tenants"]) => create_tenant(app, req).await,
        (Method::GET, ["admin", "tenants"]) => {
            admin(app, &req)?;
            Ok(json_response(
                StatusCode::OK,
                &json!({"tenants": app.registry.list().iter().map(public).collect::<Vec<_>>()}),
            ))
        }
        (Method::DELETE, ["admin", "tenants", name]) => delete_tenant(app, &req, name).await,
        (Method::POST, ["admin", "tenants", name, "rekey"]) => rekey(app, &req, name).await,
        (Method::GET, ["admin", "policies"]) => {
            admin(app, &req)?;
            Ok(policies(app))
        }
        (Method::PUT, ["admin", "policies", kind]) => put_policy(app, req, kind).await,
        (Method::DELETE, ["admin", "policies", kind]) => clear_policy(app, &req, kind).await,
        (Method::POST, ["admin", "prefixes"]) => register_prefix(app, req).await,
        (Method::GET, ["admin", "isolation-events"]) => isolation_events(app, &req),
        (_, ["health" | "metrics"] | ["v1", "models" | "completions" | "sessions"] | ["v1", "chat", "completions"])
        | (
            _,
            ["v1", "sessions", _] | ["admin", "tenants" | "policies" | "prefixes" | "isolation-events" | "metrics"],
        )
        | (_, ["admin", "tenants" | "policies", _] | ["admin", "tenants", _, "rekey"]) => {
            Err(ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", "method not allowed here"))
        }
        _ => Err(ApiError::not_found(format!("no route {path}"))),
    }
}

/// Live and ready, or draining: nothing about tenants, which an unauthenticated
/// caller must not learn.
fn health(app: &App) -> Response<Body> {
    if app.draining() {
        return json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({"status": "draining"}));
    }
    json_response(StatusCode::OK, &json!({"status": "ok", "model": app.model_id}))
}

/// Who reads the metrics.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Anyone (`/metrics`): gauges and counters over the whole server only. Per
    /// tenant figures (cache bytes by tenant, the tenant count) would tell anyone
    /// when each tenant is active and how long its prompts are.
    Public,
    /// The operator (`/admin/metrics`, admin token): everything.
    Admin,
}

/// Prometheus text format: the engine's metrics, sessions, responses by status;
/// for the operator also tenants and cache bytes per tenant.
fn metrics(app: &App, scope: Scope) -> Response<Body> {
    use std::fmt::Write;
    let engine = app.engine.metrics();
    let engine_now = engine.clone();
    let by_tenant: Vec<(String, f64)> =
        engine.cache_bytes_by_tenant.iter().map(|(t, b)| (format!("{{tenant=\"{t}\"}}"), *b as f64)).collect();
    let snapshot = serde_json::to_value(engine).expect("metrics serialize");
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP kframe_{name} {help}\n# TYPE kframe_{name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "kframe_{name}{labels} {v}");
        }
    };
    if scope == Scope::Admin {
        metric("tenants", "gauge", "Registered tenants.", &[(String::new(), app.registry.len() as f64)]);
        metric("engine_tenant_cache_bytes", "gauge", "Cache bytes held per tenant id.", &by_tenant);
    }
    let sessions = app.sessions.lock().expect("session lock").len();
    metric("sessions", "gauge", "Open sessions.", &[(String::new(), sessions as f64)]);
    let by_status: Vec<(String, f64)> = app
        .responses
        .lock()
        .expect("response counter lock")
        .iter()
        .map(|(s, n)| (format!("{{status=\"{s}\"}}"), *n as f64))
        .collect();
    metric("http_responses_total", "counter", "HTTP responses by status.", &by_status);
    const COUNTERS: [&str; 12] = [
        "decode_steps",
        "tokens_generated",
        "prompt_tokens_prefilled",
        "prompt_tokens_cached",
        "requests_finished",
        "requests_failed",
        "evictions",
        "admissions_rejected",
        "isolation_events",
        "blocks_verified",
        "pad_overflow",
        "plugin_failures",
    ];
    for (name, value) in snapshot.as_object().into_iter().flatten() {
        let Some(v) = value.as_f64() else { continue };
        // Active tenants is a count of tenants: the operator's.
        if name == "active_tenants" && scope == Scope::Public {
            continue;
        }
        if COUNTERS.contains(&name.as_str()) {
            metric(&format!("engine_{name}_total"), "counter", "Engine counter.", &[(String::new(), v)]);
        } else {
            metric(&format!("engine_{name}"), "gauge", "Engine gauge.", &[(String::new(), v)]);
        }
    }
    if scope == Scope::Admin {
        registry_metrics(app, &mut out);
    }
    gateway_metrics(app, &engine_now, &mut out);
    text_response(StatusCode::OK, "text/plain; version=0.0.4", out)
}

/// The gauges an inference gateway's endpoint picker (the Kubernetes Gateway API
/// Inference Extension, vLLM's production-stack router) reads from each model
/// server, under vLLM's names: queue depth, running requests, cache use (0-1)
/// and the cache's configuration.
fn gateway_metrics(app: &App, engine: &kframe_engine::MetricsSnapshot, out: &mut String) {
    use std::fmt::Write;
    let config = app.engine.config();
    let usage =
        if config.kv_budget == 0 { 0.0 } else { (engine.cache_bytes as f64 / config.kv_budget as f64).clamp(0.0, 1.0) };
    let model = &app.model_id;
    let gauge = |out: &mut String, name: &str, help: &str, value: f64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{model_name=\"{model}\"}} {value}");
    };
    gauge(out, "vllm:num_requests_waiting", "Requests queued, not yet admitted.", engine.queued as f64);
    gauge(out, "vllm:num_requests_running", "Requests admitted and running.", engine.sequences as f64);
    gauge(out, "vllm:kv_cache_usage_perc", "Share of the K/V cache budget in use, 0 to 1.", usage);
    let precision = match config.precision {
        kframe_core::layout::KvPrecision::Native => "native",
        kframe_core::layout::KvPrecision::Exact => "f64",
    };
    let _ = writeln!(
        out,
        "# HELP vllm:cache_config_info The K/V cache's configuration, in labels.\n# TYPE vllm:cache_config_info gauge\n\
         vllm:cache_config_info{{block_size=\"{}\",cache_dtype=\"{precision}\",kv_budget_bytes=\"{}\",enable_prefix_caching=\"true\"}} 1",
        kframe_core::integrity::BLOCK,
        config.kv_budget,
    );
}

/// How this replica keeps up with the registry: its version, syncs by trigger,
/// failures, and whether the notification connection is up.
fn registry_metrics(app: &App, out: &mut String) {
    use std::fmt::Write;
    let c = &app.cluster;
    let _ = writeln!(out, "# HELP kframe_registry_version The registry version this replica has applied.\n# TYPE kframe_registry_version gauge\nkframe_registry_version {}", app.registry.version());
    let _ = writeln!(out, "# HELP kframe_registry_syncs_total Syncs that applied registry changes, by what started them.\n# TYPE kframe_registry_syncs_total counter");
    for (trigger, n) in c.syncs.lock().expect("sync counter lock").iter() {
        let _ = writeln!(out, "kframe_registry_syncs_total{{trigger=\"{trigger}\"}} {n}");
    }
    let failures = c.sync_failures.load(std::sync::atomic::Ordering::Relaxed);
    let _ = writeln!(out, "# HELP kframe_registry_sync_failures_total Polls and syncs that could not reach the registry.\n# TYPE kframe_registry_sync_failures_total counter\nkframe_registry_sync_failures_total {failures}");
    let policy_failures = c.policy_load_failures.load(std::sync::atomic::Ordering::Relaxed);
    let _ = writeln!(out, "# HELP kframe_registry_policy_load_failures_total Registry policy components that did not load here.\n# TYPE kframe_registry_policy_load_failures_total counter\nkframe_registry_policy_load_failures_total {policy_failures}");
    if let Some(listening) = c.listening.get() {
        let connected = listening.connected.load(std::sync::atomic::Ordering::SeqCst);
        let connects = listening.connects.load(std::sync::atomic::Ordering::SeqCst);
        let _ = writeln!(out, "# HELP kframe_registry_listener_connected Whether the registry's notification connection is up.\n# TYPE kframe_registry_listener_connected gauge\nkframe_registry_listener_connected {}", u8::from(connected));
        let _ = writeln!(out, "# HELP kframe_registry_listener_connects_total Times the notification connection was established.\n# TYPE kframe_registry_listener_connects_total counter\nkframe_registry_listener_connects_total {connects}");
    }
}

fn models(app: &App) -> Response<Body> {
    json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": [{"id": app.model_id, "object": "model", "created": 0, "owned_by": "kframe"}]}),
    )
}

fn tenant(app: &App, req: &Request<Incoming>) -> Result<TenantRecord, ApiError> {
    bearer(req)?.and_then(|key| app.registry.authenticate(key)).ok_or_else(ApiError::unauthorized)
}

fn admin(app: &App, req: &Request<Incoming>) -> Result<(), ApiError> {
    match bearer(req)? {
        Some(token) if app.is_admin(token) => Ok(()),
        _ => Err(ApiError::unauthorized()),
    }
}

fn tenant_or_admin(app: &App, req: &Request<Incoming>) -> Result<(), ApiError> {
    admin(app, req).or_else(|_| tenant(app, req).map(|_| ()))
}

fn public(t: &TenantRecord) -> serde_json::Value {
    json!({"id": t.id, "name": t.name, "key_id": t.key_id, "epoch": t.epoch, "tier": t.tier, "created": t.created_unix})
}

fn registry_error(e: RegistryError) -> ApiError {
    match e {
        RegistryError::Exists(_) => ApiError::new(StatusCode::CONFLICT, "invalid_request_error", e.to_string()),
        RegistryError::NotFound(_) => ApiError::not_found(e.to_string()),
        RegistryError::InvalidName(_) => ApiError::bad_request(e.to_string()),
        RegistryError::Unavailable { .. } => ApiError::unavailable(e.to_string()),
        RegistryError::Storage { .. } | RegistryError::Config(_) => ApiError::internal(e.to_string()),
    }
}

fn random_id(prefix: &str) -> String {
    kframe_registry::random_token(prefix)[..prefix.len() + 24].to_owned()
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

// ---- tenants' endpoints ----

fn new_session(app: &App, req: &Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let t = tenant(app, req)?;
    let mut sessions = app.sessions.lock().expect("session lock");
    if sessions.values().filter(|&&owner| owner == t.id).count() >= app.limits.max_sessions_per_tenant {
        return Err(too_many_sessions(app));
    }
    let random = random_id("sess-");
    let id = format!("{random}{}", app.session_tag(t.id, &random));
    sessions.insert(id.clone(), t.id);
    Ok(json_response(StatusCode::CREATED, &json!({"id": id, "object": "session"})))
}

fn too_many_sessions(app: &App) -> ApiError {
    let msg = format!("at most {} open sessions per tenant; delete one first", app.limits.max_sessions_per_tenant);
    ApiError::new(StatusCode::TOO_MANY_REQUESTS, "invalid_request_error", msg)
}

/// Whether `id` is a session of `tenant` this replica may serve: one it holds,
/// or one another replica issued to the same tenant (it carries their tag),
/// which is taken up here as a cache miss. A session ended here stays ended.
fn own_session(app: &App, tenant: u64, id: &str) -> Result<(), ApiError> {
    let mut sessions = app.sessions.lock().expect("session lock");
    match sessions.get(id) {
        Some(&owner) if owner == tenant => return Ok(()),
        Some(_) => return Err(unknown_session(id)),
        None => {}
    }
    let issued = id.is_ascii()
        && id.len() == "sess-".len() + 40
        && app.session_tag(tenant, &id[..id.len() - 16]) == id[id.len() - 16..];
    if !issued || app.ended_sessions.lock().expect("session lock").contains(id) {
        return Err(unknown_session(id));
    }
    if sessions.values().filter(|&&owner| owner == tenant).count() >= app.limits.max_sessions_per_tenant {
        return Err(too_many_sessions(app));
    }
    sessions.insert(id.to_owned(), tenant);
    Ok(())
}

/// Ends a session: the id stops working, and the engine zeroes and frees its cache
/// at once (or when the request using it ends).
async fn end_session(app: &App, req: &Request<Incoming>, id: &str) -> Result<Response<Body>, ApiError> {
    let t = tenant(app, req)?;
    own_session(app, t.id, id)?;
    app.sessions.lock().expect("session lock").remove(id);
    app.ended_sessions.lock().expect("session lock").put(id.to_owned(), ());
    app.engine.end_session(t.id, id.to_owned()).await.map_err(engine_error)?;
    Ok(json_response(StatusCode::OK, &json!({"id": id, "deleted": true})))
}

/// The same answer for a session that never existed and for another tenant's,
/// so that one tenant cannot learn which session ids another holds.
fn unknown_session(id: &str) -> ApiError {
    ApiError::not_found(format!("no session `{id}`")).with_code("session_not_found")
}

/// What a validated request turns into.
struct Job {
    prompt: Vec<u32>,
    params: SamplingParams,
    stops: Vec<String>,
    stream: bool,
    session: Option<String>,
}

fn job(app: &App, prompt: Vec<u32>, s: Sampling, default_max: usize) -> Result<Job, ApiError> {
    if let Some(model) = &s.model {
        if model != &app.model_id {
            let msg = format!("model `{model}` is not served here; this server serves `{}`", app.model_id);
            return Err(ApiError::not_found(msg).with_code("model_not_found"));
        }
    }
    if s.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request("n must be 1"));
    }
    // The prompt itself is validated once, at the engine's door (its first event
    // is the refusal).
    let max_tokens = match s.max_completion_tokens.or(s.max_tokens) {
        Some(0) => return Err(ApiError::bad_request("max_tokens must be at least 1")),
        Some(n) if n > app.limits.max_tokens as u64 => {
            return Err(ApiError::bad_request(format!("max_tokens is at most {}", app.limits.max_tokens)))
        }
        Some(n) => n as usize,
        None => default_max.min(app.limits.max_tokens),
    };
    let temperature = s.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_request("temperature must be between 0 and 2"));
    }
    if let Some(p) = s.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::bad_request("top_p must be in (0, 1]"));
        }
    }
    let stops = s.stop.map(|s| s.into_vec()).unwrap_or_default();
    if stops.len() > 4 || stops.iter().any(|s| s.is_empty() || s.len() > 256) {
        return Err(ApiError::bad_request("stop takes up to 4 non-empty strings of at most 256 bytes"));
    }
    let params = SamplingParams { max_tokens, temperature, top_p: s.top_p, seed: s.seed.unwrap_or(0) };
    Ok(Job { prompt, params, stops, stream: s.stream, session: s.session })
}

/// Tokenizes `text` on the blocking pool, so that a large prompt never stalls the
/// async workers (and with them `/health` and every other request); first refuses
/// a text that cannot fit the prompt limit whatever its tokens (each token is at
/// most `max_token_bytes` long), without tokenizing it at all.
async fn encode(app: &App, text: String) -> Result<Vec<u32>, ApiError> {
    let limit = app.max_prompt_tokens;
    if text.len() > limit.saturating_mul(app.max_token_bytes) {
        let msg = format!("the prompt's {} bytes cannot fit in {limit} tokens", text.len());
        return Err(ApiError::bad_request(msg).with_code("context_length_exceeded"));
    }
    let tokenizer = app.tokenizer.clone();
    let enc = tokio::task::spawn_blocking(move || tokenizer.encode(text.as_str(), false))
        .await
        .map_err(|e| ApiError::internal(format!("tokenizing: {e}")))?
        .map_err(|e| ApiError::bad_request(format!("tokenizing: {e}")))?;
    Ok(enc.get_ids().to_vec())
}

async fn generate(app: &Arc<App>, req: Request<Incoming>, endpoint: Endpoint) -> Result<Response<Body>, ApiError> {
    let record = tenant(app, &req)?;
    let header_session = req
        .headers()
        .get("x-kframe-session")
        .map(|v| v.to_str().map(str::to_owned).map_err(|_| ApiError::bad_request("X-Kframe-Session is not text")))
        .transpose()?;
    let body = read_body(req, app.limits.max_body_bytes, app.limits.body_timeout).await?;
    let mut job = match endpoint {
        Endpoint::Completions => {
            let r: CompletionRequest = parse_json(&body)?;
            let prompt = match r.prompt {
                Prompt::Text(t) => encode(app, t).await?,
                Prompt::Texts(mut v) if v.len() == 1 => encode(app, v.remove(0)).await?,
                Prompt::Texts(_) => return Err(ApiError::bad_request("prompt: kframe takes one prompt per request")),
                Prompt::Tokens(ids) => ids,
            };
            // OpenAI's default for completions.
            job(app, prompt, r.sampling, 16)?
        }
        Endpoint::Chat => {
            let r: ChatRequest = parse_json(&body)?;
            if r.messages.is_empty() {
                return Err(ApiError::bad_request("messages is empty"));
            }
            let messages = r
                .messages
                .iter()
                .map(|m| m.content.text().map(|t| (m.role.clone(), t)))
                .collect::<Result<Vec<_>, _>>()
                .map_err(ApiError::bad_request)?;
            let text = app.template.render(&messages).map_err(ApiError::bad_request)?;
            let prompt = encode(app, text).await?;
            let room = app.context_window.saturating_sub(prompt.len());
            job(app, prompt, r.sampling, room)?
        }
    };
    if job.session.is_none() {
        job.session = header_session;
    }
    if let Some(id) = &job.session {
        own_session(app, record.id, id)?;
    }
    let mut events = {
        let _epoch = app.rekey.read().await;
        // The record as of now, by the id the key authenticated: a re-key may have
        // finished while the body arrived (the epoch moves on), or a delete (the id
        // is gone for good, even if the name was created again).
        let record = app.registry.get_by_id(record.id).ok_or_else(ApiError::unauthorized)?;
        app.engine.submit(Submit {
            tenant: frame(&record),
            session: job.session.clone(),
            prompt: job.prompt.clone(),
            params: job.params,
        })
    };
    let id = random_id(if endpoint == Endpoint::Chat { "chatcmpl-" } else { "cmpl-" });
    let created = now_unix();
    let first = events.next().await.unwrap_or(Event::Failed(EngineError::ShutDown));
    if let Event::Failed(e) = first {
        return Err(engine_error(e));
    }
    let prompt_len = job.prompt.len();
    if !job.stream {
        let reply = Reply { endpoint, id: &id, created, model: &app.model_id, session: job.session.as_deref() };
        let mut sink = JsonSink::default();
        completion::fold(first, &mut events, job.stops, prompt_len, &mut sink).await;
        drop(events);
        return Ok(json_response(StatusCode::OK, &sink.body(&reply)?));
    }
    // Streaming: the status is sent now, so from here a failure ends the stream
    // with an error event instead.
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let (model, session) = (app.model_id.clone(), job.session.clone());
    tokio::spawn(async move {
        let reply = Reply { endpoint, id: &id, created, model: &model, session: session.as_deref() };
        let mut sink = SseSink::new(tx, reply);
        // Returning drops `events`: a client that left cancels the request.
        completion::fold(first, &mut events, job.stops, prompt_len, &mut sink).await;
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::Stream(rx))
        .expect("a valid response"))
}

// ---- admin endpoints ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTenant {
    name: String,
    #[serde(default)]
    tier: u8,
}

async fn create_tenant(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    admin(app, &req)?;
    let body = read_body(req, app.limits.max_body_bytes, app.limits.body_timeout).await?;
    let new: NewTenant = parse_json(&body)?;
    let ((record, key), _) = app.write(app.registry.create(&new.name, new.tier)).await.map_err(registry_error)?;
    let mut v = public(&record);
    v["api_key"] = json!(key.as_str());
    Ok(json_response(StatusCode::CREATED, &v))
}

/// Key-drop delete: the api key stops working at once (the registry forgets it
/// before the engine is told), then every cache block of the tenant is zeroed
/// and freed and its rotations forgotten. Other replicas do the same when the
/// registry tells them.
async fn delete_tenant(app: &Arc<App>, req: &Request<Incoming>, name: &str) -> Result<Response<Body>, ApiError> {
    admin(app, req)?;
    let (record, applied) = app.write(app.registry.delete(name)).await.map_err(registry_error)?;
    let removed = applied.removed.get(&record.id).copied().unwrap_or(0);
    Ok(json_response(StatusCode::OK, &json!({"name": name, "deleted": true, "sessions_removed": removed})))
}

/// Moves the tenant to its next key epoch; its cached sessions are re-rotated in
/// place and keep working, here and on every replica the registry tells.
async fn rekey(app: &Arc<App>, req: &Request<Incoming>, name: &str) -> Result<Response<Body>, ApiError> {
    admin(app, req)?;
    let (after, applied) = app.write(app.registry.bump_epoch(name)).await.map_err(registry_error)?;
    let rekeyed = applied.rekeyed.get(&after.id).copied().unwrap_or(0);
    Ok(json_response(StatusCode::OK, &json!({"name": name, "epoch": after.epoch, "sessions_rekeyed": rekeyed})))
}

fn policy_kind(kind: &str) -> Result<PolicyKind, ApiError> {
    PolicyKind::ALL
        .into_iter()
        .find(|k| k.world().trim_end_matches("-policy") == kind)
        .ok_or_else(|| ApiError::not_found(format!("no policy kind `{kind}`: use admission, eviction or depth-gate")))
}

/// Each kind's component, its calls and failures; for a component from the
/// registry its sha256, and why it did not load here if it did not.
fn policies(app: &App) -> Response<Body> {
    let stats = app.engine.policies().stats();
    let loaded = app.loaded_policies.lock().expect("policy lock").clone();
    let entry = |kind: PolicyKind, s: &kframe_policy::set::WorldStats| {
        let stored = loaded.get(&kind);
        json!({
            "kind": kind.world().trim_end_matches("-policy"),
            "component": s.plugin,
            "calls": s.calls,
            "failures": s.failures,
            "sha256": stored.map(|l| &l.sha256),
            "load_error": stored.and_then(|l| l.error.as_ref()),
        })
    };
    json_response(
        StatusCode::OK,
        &json!({"policies": [
            entry(PolicyKind::Admission, &stats.admission),
            entry(PolicyKind::Eviction, &stats.eviction),
            entry(PolicyKind::DepthGate, &stats.depth_gate),
        ]}),
    )
}

/// The body is the component's bytes; `?name=` names it and `?config=` is the
/// string its `configure` receives. It is compiled and checked off the serving
/// path and swapped in only if it loads; otherwise the current policy stays.
async fn put_policy(app: &Arc<App>, req: Request<Incoming>, kind: &str) -> Result<Response<Body>, ApiError> {
    admin(app, &req)?;
    let kind = policy_kind(kind)?;
    let param = |key: &str| query_param(&req, key);
    let name = param("name").unwrap_or_else(|| kind.world().to_owned());
    let config = param("config").unwrap_or_default();
    // Components are larger than chat bodies.
    let wasm = read_body(req, 64 << 20, app.limits.body_timeout).await?;
    let policies = app.engine.policies().clone();
    let (n, c, w) = (name.clone(), config.clone(), wasm.clone());
    tokio::task::spawn_blocking(move || policies.swap(kind, &n, &w, &c))
        .await
        .map_err(|e| ApiError::internal(format!("loading the component: {e}")))?
        .map_err(|e| ApiError::bad_request(format!("component refused: {e}")).with_code("invalid_component"))?;
    let record = PolicyRecord { name: name.clone(), config, wasm: wasm.to_vec() };
    let loaded = crate::app::LoadedPolicy { sha256: record.sha256(), error: None };
    let before = app.loaded_policies.lock().expect("policy lock").insert(kind, loaded);
    if let Err(e) = app.write(app.registry.set_policy(kind.world(), Some(&record))).await {
        // Not recorded, so not run: every replica keeps running the same policy.
        app.loaded_policies.lock().expect("policy lock").remove(&kind);
        match app.registry.policies().into_iter().find(|(world, _)| world == kind.world()) {
            Some((_, p)) => {
                let (policies, sha256) = (app.engine.policies().clone(), p.sha256());
                let back = tokio::task::spawn_blocking(move || policies.swap(kind, &p.name, &p.wasm, &p.config)).await;
                if matches!(back, Ok(Ok(()))) {
                    let loaded = before.unwrap_or(crate::app::LoadedPolicy { sha256, error: None });
                    app.loaded_policies.lock().expect("policy lock").insert(kind, loaded);
                }
            }
            None => app.engine.policies().clear(kind),
        }
        return Err(registry_error(e));
    }
    Ok(json_response(StatusCode::OK, &json!({"kind": kind.world().trim_end_matches("-policy"), "component": name})))
}

async fn clear_policy(app: &App, req: &Request<Incoming>, kind: &str) -> Result<Response<Body>, ApiError> {
    admin(app, req)?;
    let kind = policy_kind(kind)?;
    app.engine.policies().clear(kind);
    app.loaded_policies.lock().expect("policy lock").remove(&kind);
    app.write(app.registry.set_policy(kind.world(), None)).await.map_err(registry_error)?;
    Ok(json_response(StatusCode::OK, &json!({"kind": kind.world().trim_end_matches("-policy"), "component": null})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewPrefix {
    text: String,
}

async fn register_prefix(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    admin(app, &req)?;
    let body = read_body(req, app.limits.max_body_bytes, app.limits.body_timeout).await?;
    let new: NewPrefix = parse_json(&body)?;
    let tokens = encode(app, new.text.clone()).await?;
    let info = app.engine.register_prefix(tokens).await.map_err(engine_error)?;
    app.write(app.registry.add_prefix(&new.text)).await.map_err(registry_error)?;
    Ok(json_response(StatusCode::CREATED, &json!(info)))
}

/// The percent-decoded value of `?key=` in the request's query string.
fn query_param<B>(req: &Request<B>, key: &str) -> Option<String> {
    let query = req.uri().query()?;
    query.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == key).map(|(_, v)| percent_decode(v))
}

/// The most recent isolation events, newest last; `?tenant=NAME` keeps one
/// tenant's and `?limit=` (default 100) the last so many. An event's `tenant` is the
/// reader's frame identity (its `key_id` in the tenant list), never a name.
fn isolation_events(app: &App, req: &Request<Incoming>) -> Result<Response<Body>, ApiError> {
    admin(app, req)?;
    let limit = match query_param(req, "limit") {
        None => 100,
        Some(v) => v.parse::<usize>().map_err(|_| ApiError::bad_request(format!("limit={v:?} is not a count")))?,
    };
    // Events name the reader by its frame identity; the operator asks by name.
    let key_id = query_param(req, "tenant")
        .map(|name| app.registry.get(&name).map_or_else(|| format!("no tenant {name}"), |t| t.key_id));
    let events: Vec<_> =
        app.engine.isolation_events().into_iter().filter(|e| key_id.as_ref().is_none_or(|k| &e.tenant == k)).collect();
    let shown = &events[events.len().saturating_sub(limit)..];
    Ok(json_response(StatusCode::OK, &json!({"events": shown, "total": app.engine.metrics().isolation_events})))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (b[i], b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(hi), Some(lo)) => {
                out.push(hi << 4 | lo);
                i += 2;
            }
            (b'+', _, _) => out.push(b' '),
            (c, _, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
