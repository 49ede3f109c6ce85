//! Cluster mode, end to end: three real `kframe serve` replicas on one real
//! PostgreSQL, behind a real HAProxy running the shipped
//! examples/cluster/haproxy.cfg, all started by the test on 127.0.0.1 in a
//! temporary directory and stopped at its end.

mod common;

use common::{post_to, request_to, Resp, Server};
use kframe_testkit::postgres::{free_port, Postgres};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const NAMES: [&str; 3] = ["a", "b", "c"];
/// The replicas' registry poll, in milliseconds.
const POLL_MS: u64 = 250;

struct Cluster {
    pg: Postgres,
    tmp: tempfile::TempDir,
    ports: [u16; 3],
    replicas: Vec<Option<Server>>,
    extra: Vec<Vec<String>>,
    haproxy: Option<(Child, String)>,
    /// Last, so that it is released after everything above has stopped.
    _turn: std::sync::MutexGuard<'static, ()>,
}

/// One cluster at a time: on a 2-core machine, several clusters side by side
/// starve HAProxy's health checks, and a replica marked down moves its tenants.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Cluster {
    /// PostgreSQL, shared secrets, and three replicas; `extra` adds arguments per replica.
    fn start(extra: [&[&str]; 3]) -> Self {
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let pg = Postgres::start();
        let tmp = tempfile::tempdir().unwrap();
        write_secrets(&tmp.path().join("secrets"));
        let ports = [free_port(), free_port(), free_port()];
        let extra = extra.iter().map(|e| e.iter().map(|s| s.to_string()).collect()).collect();
        let mut cluster = Self { _turn: turn, pg, tmp, ports, replicas: vec![None, None, None], extra, haproxy: None };
        for i in 0..3 {
            cluster.start_replica(i);
        }
        cluster
    }

    fn start_replica(&mut self, i: usize) {
        let data = self.tmp.path().join(format!("data-{}", NAMES[i]));
        let secrets = self.tmp.path().join("secrets");
        let (url, addr, poll) = (self.pg.url(), format!("127.0.0.1:{}", self.ports[i]), POLL_MS.to_string());
        let mut args: Vec<&str> = vec!["--registry", &url, "--secrets-dir", secrets.to_str().unwrap()];
        args.extend(["--replica-name", NAMES[i], "--addr", &addr, "--registry-poll-ms", &poll]);
        args.extend(self.extra[i].iter().map(String::as_str));
        self.replicas[i] = Some(Server::start_on(None, &data, &args));
    }

    fn replica(&self, i: usize) -> &Server {
        self.replicas[i].as_ref().expect("a running replica")
    }

    fn admin(&self) -> String {
        self.replica(0).admin.clone()
    }

    /// kill -9.
    fn kill(&mut self, i: usize) {
        let mut server = self.replicas[i].take().unwrap();
        server.child.kill().unwrap();
        server.child.wait().unwrap();
    }

    /// HAProxy on the shipped configuration; waits until every replica answers through it.
    fn start_haproxy(&mut self) -> String {
        let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/cluster/haproxy.cfg");
        let front = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(haproxy());
        cmd.arg("-db").arg("-f").arg(&cfg).env("KFRAME_LISTEN", &front);
        for (i, name) in NAMES.iter().enumerate() {
            cmd.env(format!("KFRAME_REPLICA_{}", name.to_uppercase()), format!("127.0.0.1:{}", self.ports[i]));
        }
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("haproxy starts");
        self.haproxy = Some((child, front.clone()));
        wait_for(Duration::from_secs(20), "haproxy to answer", || {
            std::net::TcpStream::connect(&front).is_ok()
                && request_to(&front, "GET", "/health", None, &[], b"").status == 200
        });
        front
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some((mut child, _)) = self.haproxy.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn haproxy() -> PathBuf {
    ["/usr/sbin/haproxy", "/usr/local/sbin/haproxy", "/usr/bin/haproxy"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("haproxy is installed (scripts/test.sh installs it)")
}

/// One master secret and admin token for every replica, mode 0600, made once.
fn write_secrets(dir: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).unwrap();
    let mut bytes = [0u8; 64];
    std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes)).unwrap();
    let token: String = bytes[32..].iter().map(|b| format!("{b:02x}")).collect();
    for (file, content) in [("master.key", bytes[..32].to_vec()), ("admin.token", format!("kfa-{token}").into_bytes())]
    {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(dir.join(file)).unwrap();
        f.write_all(&content).unwrap();
    }
}

fn wait_for(limit: Duration, what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

fn get(addr: &str, path: &str, token: &str) -> Resp {
    request_to(addr, "GET", path, Some(token), &[], b"")
}

fn replica_of(r: &Resp) -> String {
    r.header("x-kframe-replica").unwrap_or_else(|| panic!("no x-kframe-replica: {}", r.status)).to_owned()
}

fn create(addr: &str, admin: &str, name: &str) -> (u64, String) {
    let r = post_to(addr, "/admin/tenants", admin, &json!({"name": name}));
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    (v["id"].as_u64().unwrap(), v["api_key"].as_str().unwrap().to_owned())
}

fn epoch_on(addr: &str, admin: &str, name: &str) -> Option<u64> {
    let listed = get(addr, "/admin/tenants", admin).json();
    listed["tenants"].as_array().unwrap().iter().find(|t| t["name"] == name).map(|t| t["epoch"].as_u64().unwrap())
}

fn complete(addr: &str, key: &str, prompt: &str, session: Option<&str>) -> Resp {
    let mut body = json!({"prompt": prompt, "max_tokens": 4, "temperature": 0});
    if let Some(s) = session {
        body["session"] = json!(s);
    }
    post_to(addr, "/v1/completions", key, &body)
}

fn cached_tokens(r: &Resp) -> u64 {
    r.json()["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap()
}

/// `name{labels} value` samples of Prometheus text, checked line by line: every
/// sample follows a `# TYPE` of its family and its value parses.
fn prometheus(text: &str) -> BTreeMap<String, (String, f64)> {
    let mut types = BTreeMap::new();
    let mut samples = BTreeMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["gauge", "counter"].contains(&kind), "{line}");
            types.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line}"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                && !name.starts_with(char::is_numeric),
            "{line}"
        );
        let kind = types.get(name).unwrap_or_else(|| panic!("no TYPE before {line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("not a number: {line}"));
        samples.insert(series.to_owned(), (kind.clone(), value));
    }
    samples
}

fn gauge(samples: &BTreeMap<String, (String, f64)>, prefix: &str) -> f64 {
    let (_, (kind, v)) = samples.iter().find(|(s, _)| s.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix}"));
    assert_eq!(kind, "gauge", "{prefix}");
    *v
}

#[test]
fn three_replicas_on_one_postgres_share_tenants_policies_and_deletes_and_export_the_gateway_gauges() {
    let c = Cluster::start([&[], &[], &[]]);
    let admin = c.admin();
    let addrs: Vec<String> = (0..3).map(|i| c.replica(i).addr.clone()).collect();
    let (alice, key) = create(&addrs[0], &admin, "alice");
    assert!(key.starts_with(&format!("kf_{alice}_")), "the key carries the tenant id: {key}");

    // Made on A, it authenticates directly on B and C (a create answers only
    // after A applied it; B and C hear by notification or poll).
    for addr in &addrs[1..] {
        wait_for(Duration::from_secs(10), "the tenant to reach every replica", || {
            get(addr, "/v1/models", &key).status == 200
        });
    }
    let secret = key.rsplit('_').next().unwrap();
    let flipped = format!("kf_{alice}_{}{}", if secret.starts_with('0') { "1" } else { "0" }, &secret[1..]);
    for (i, addr) in addrs.iter().enumerate() {
        for bad in [flipped.as_str(), "kf-nope", &format!("kf_{}_{secret}", alice + 1)] {
            let r = get(addr, "/v1/models", bad);
            assert_eq!(r.status, 401, "{bad} on {}: {}", NAMES[i], r.text());
            assert_eq!(replica_of(&r), NAMES[i]);
        }
        let r = complete(addr, &key, "user: hello there.", None);
        assert_eq!(r.status, 200, "{}", r.text());
    }

    // A policy put on A is loaded by B and C.
    let lfu = std::fs::read(kframe_policy::shipped("lfu")).expect("built by scripts/build-plugins.sh");
    let put = request_to(&addrs[0], "PUT", "/admin/policies/eviction?name=lfu", Some(&admin), &[], &lfu);
    assert_eq!(put.status, 200, "{}", put.text());
    for addr in &addrs {
        wait_for(Duration::from_secs(10), "the policy on every replica", || {
            let p = get(addr, "/admin/policies", &admin).json();
            p["policies"][1]["component"] == "lfu" && p["policies"][1]["load_error"].is_null()
        });
    }

    // Each replica holds a session's cache for alice; the gauges say so.
    let mut sessions = Vec::new();
    for addr in &addrs {
        let s = post_to(addr, "/v1/sessions", &key, &json!({})).json()["id"].as_str().unwrap().to_owned();
        assert_eq!(complete(addr, &key, "user: remember 4821.", Some(&s)).status, 200);
        sessions.push(s);
    }
    // A's session, on B: taken up as a cache miss, then continued on B's cache.
    let moved = complete(&addrs[1], &key, "user: remember 4821. user: and?", Some(&sessions[0]));
    assert_eq!((moved.status, cached_tokens(&moved)), (200, 0), "{}", moved.text());
    let again = complete(&addrs[1], &key, "user: remember 4821. user: and? user: well?", Some(&sessions[0]));
    assert!(cached_tokens(&again) > 0, "{}", again.text());
    // Forged or mangled ids read as sessions that never existed; an ended one stays ended.
    let forged =
        format!("{}{}", &sessions[0][..sessions[0].len() - 1], if sessions[0].ends_with('0') { "1" } else { "0" });
    let mangled = format!("{}é", &sessions[0][..sessions[0].len() - 2]);
    for id in [forged.as_str(), mangled.as_str()] {
        let r = complete(&addrs[2], &key, "user: hi.", Some(id));
        assert_eq!(r.status, 404, "{id}: {}", r.text());
    }

    for addr in &addrs {
        let text = request_to(addr, "GET", "/metrics", None, &[], b"").text();
        let m = prometheus(&text);
        let usage = gauge(&m, "vllm:kv_cache_usage_perc");
        assert!(usage > 0.0 && usage <= 1.0, "{usage}");
        assert_eq!(gauge(&m, "vllm:num_requests_waiting"), 0.0);
        assert_eq!(gauge(&m, "vllm:num_requests_running"), 0.0);
        assert_eq!(gauge(&m, "vllm:cache_config_info"), 1.0);
        let admin_m = prometheus(&get(addr, "/admin/metrics", &admin).text());
        assert_eq!(gauge(&admin_m, "kframe_registry_listener_connected"), 1.0);
        assert!(gauge(&admin_m, &format!("kframe_engine_tenant_cache_bytes{{tenant=\"{alice}\"}}")) > 0.0);
    }

    let ended = request_to(&addrs[2], "DELETE", &format!("/v1/sessions/{}", sessions[2]), Some(&key), &[], b"");
    assert_eq!(ended.status, 200, "{}", ended.text());
    assert_eq!(complete(&addrs[2], &key, "user: hi.", Some(&sessions[2])).status, 404);

    // A delete through B: the key stops working everywhere, and every replica
    // zeroes and frees her caches.
    let r = request_to(&addrs[1], "DELETE", "/admin/tenants/alice", Some(&admin), &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(get(&addrs[1], "/v1/models", &key).status, 401, "at once on B");
    for addr in &addrs {
        wait_for(Duration::from_secs(10), "the delete on every replica", || {
            get(addr, "/v1/models", &key).status == 401
        });
        let admin_text = get(addr, "/admin/metrics", &admin).text();
        assert!(
            !admin_text.contains(&format!("kframe_engine_tenant_cache_bytes{{tenant=\"{alice}\"}}")),
            "{admin_text}"
        );
        let m = prometheus(&request_to(addr, "GET", "/metrics", None, &[], b"").text());
        assert_eq!(gauge(&m, "vllm:kv_cache_usage_perc"), 0.0);
    }
    assert_eq!(c.pg.sql("SELECT count(*) FROM tenants"), "0");
}

#[test]
fn through_haproxy_each_tenant_sticks_to_one_replica_and_a_killed_replica_moves_only_its_own() {
    let mut c = Cluster::start([&[], &[], &[]]);
    let admin = c.admin();
    let front = c.start_haproxy();
    let tenants: Vec<(u64, String)> = (0..50).map(|i| create(&front, &admin, &format!("t{i}"))).collect();
    let route = |key: &str| -> Option<String> {
        let r = get(&front, "/v1/models", key);
        (r.status == 200).then(|| replica_of(&r))
    };
    // Every tenant is known everywhere before routing is looked at.
    for i in 0..3 {
        let addr = c.replica(i).addr.clone();
        wait_for(Duration::from_secs(10), "every tenant on every replica", || {
            get(&addr, "/v1/models", &tenants[49].1).status == 200
        });
    }
    let home: Vec<String> = tenants.iter().map(|(_, k)| route(k).unwrap()).collect();
    for _ in 0..2 {
        for ((_, key), home) in tenants.iter().zip(&home) {
            assert_eq!(
                route(key).as_deref(),
                Some(home.as_str()),
                "a tenant always reaches the same replica: {home:?}"
            );
        }
    }
    let mut per_replica = BTreeMap::<&str, usize>::new();
    for h in &home {
        *per_replica.entry(h).or_default() += 1;
    }
    assert_eq!(per_replica.len(), 3, "consistent hashing spreads 50 tenants over all three: {per_replica:?}");

    // A session continues on cached tokens, on her replica.
    let key = &tenants[0].1;
    let s = post_to(&front, "/v1/sessions", key, &json!({})).json()["id"].as_str().unwrap().to_owned();
    let first = complete(&front, key, "user: remember the code 4821 please.", Some(&s));
    assert_eq!((first.status, replica_of(&first)), (200, home[0].clone()));
    let second = complete(&front, key, "user: remember the code 4821 please. user: what was it?", Some(&s));
    assert_eq!((second.status, replica_of(&second)), (200, home[0].clone()));
    assert!(cached_tokens(&second) > 0, "{}", second.text());

    let before = c.pg.sql("SELECT string_agg(id || ':' || name || ':' || epoch, ',' ORDER BY id) FROM tenants");
    let epochs_before = c.pg.sql("SELECT count(*) FROM key_epochs");

    // Under load, kill -9 the replica with the most tenants.
    let victim_name = per_replica.iter().max_by_key(|(_, n)| **n).unwrap().0.to_string();
    let victim = NAMES.iter().position(|n| *n == victim_name).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load: Vec<_> = (0..3)
        .map(|t| {
            let (stop, served, failed) = (stop.clone(), served.clone(), failed.clone());
            let (front, tenants) = (front.clone(), tenants.clone());
            std::thread::spawn(move || {
                let mut i = t;
                while !stop.load(Ordering::SeqCst) {
                    let r = complete(&front, &tenants[i % 50].1, "user: hi.", None);
                    if r.status == 200 {
                        served.fetch_add(1, Ordering::SeqCst);
                    } else {
                        eprintln!("under load: {} {}", r.status, r.text());
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                    i += 7;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    c.kill(victim);
    let killed = Instant::now();
    // Every tenant still gets an answer, each at its first try.
    let mut slowest = Duration::ZERO;
    for (_, key) in &tenants {
        let asked = Instant::now();
        let r = complete(&front, key, "user: are you there?", None);
        assert_eq!(r.status, 200, "{}", r.text());
        slowest = slowest.max(asked.elapsed());
    }
    let swept = killed.elapsed();
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.join().unwrap();
    }
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "no request under load failed ({} served)",
        served.load(Ordering::SeqCst)
    );
    eprintln!("after kill -9 of {victim_name}: all 50 tenants answered within {swept:?}, slowest {slowest:?}");

    // Once HAProxy has marked it down, only its own tenants have moved.
    wait_for(Duration::from_secs(10), "the dead replica to leave the ring", || {
        tenants.iter().all(|(_, k)| route(k).as_deref() != Some(victim_name.as_str()))
    });
    for ((_, key), home) in tenants.iter().zip(&home) {
        let now = route(key).unwrap();
        if *home == victim_name {
            assert_ne!(now, victim_name);
        } else {
            assert_eq!(&now, home, "a tenant of a live replica did not move");
        }
    }
    assert_eq!(c.pg.sql("SELECT string_agg(id || ':' || name || ':' || epoch, ',' ORDER BY id) FROM tenants"), before);
    assert_eq!(c.pg.sql("SELECT count(*) FROM key_epochs"), epochs_before);

    // Restarted, it takes its tenants back.
    c.start_replica(victim);
    wait_for(Duration::from_secs(20), "the tenants to map back", || {
        tenants.iter().zip(&home).all(|((_, k), h)| route(k).as_deref() == Some(h.as_str()))
    });
}

#[test]
fn a_rekey_through_one_replica_reaches_the_others_by_notification_and_by_poll_alone() {
    // B waits a minute before reconnecting a lost notification connection, so
    // that once it is cut only the poll can bring B up to date.
    let c = Cluster::start([&[], &["--registry-listen-retry-ms", "60000"], &[]]);
    let admin = c.admin();
    let addrs: Vec<String> = (0..3).map(|i| c.replica(i).addr.clone()).collect();
    let (_, key) = create(&addrs[0], &admin, "alice");
    for addr in &addrs {
        wait_for(Duration::from_secs(10), "alice everywhere", || get(addr, "/v1/models", &key).status == 200);
    }
    // B and C hold cached sessions of alice at epoch 0.
    let first = "user: remember the code 4821 please.";
    let sessions: Vec<String> = addrs[1..]
        .iter()
        .map(|addr| {
            let s = post_to(addr, "/v1/sessions", &key, &json!({})).json()["id"].as_str().unwrap().to_owned();
            assert_eq!(complete(addr, &key, first, Some(&s)).status, 200);
            s
        })
        .collect();

    let rekey = |via: &str| -> u64 {
        let r = post_to(via, "/admin/tenants/alice/rekey", &admin, &json!({}));
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["epoch"].as_u64().unwrap()
    };
    assert_eq!(rekey(&addrs[0]), 1);
    for (addr, s) in addrs[1..].iter().zip(&sessions) {
        let delay = wait_for(Duration::from_secs(10), "epoch 1", || epoch_on(addr, &admin, "alice") == Some(1));
        eprintln!("re-key reached {addr} by notification in {delay:?}");
        // The session was re-rotated into epoch 1 there: served from its cache.
        let r = complete(addr, &key, &format!("{first} user: what was it?"), Some(s));
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(cached_tokens(&r) > 0, "{}", r.text());
        let m = prometheus(&get(addr, "/admin/metrics", &admin).text());
        assert!(gauge(&m, "kframe_registry_version") >= 2.0);
    }

    // Cut B's notification connection; only the poll is left.
    let cut = c.pg.sql(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'kframe-listener b'",
    );
    assert_eq!(cut, "1");
    wait_for(Duration::from_secs(10), "B to see its listener gone", || {
        gauge(&prometheus(&get(&addrs[1], "/admin/metrics", &admin).text()), "kframe_registry_listener_connected")
            == 0.0
    });
    let polls = |addr: &str| {
        prometheus(&get(addr, "/admin/metrics", &admin).text())
            .get("kframe_registry_syncs_total{trigger=\"poll\"}")
            .map_or(0.0, |s| s.1)
    };
    let polls_before = polls(&addrs[1]);
    assert_eq!(rekey(&addrs[0]), 2);
    let delay =
        wait_for(Duration::from_secs(10), "epoch 2 on B by poll", || epoch_on(&addrs[1], &admin, "alice") == Some(2));
    eprintln!("re-key reached B by poll alone in {delay:?} (poll every {POLL_MS} ms)");
    let m = prometheus(&get(&addrs[1], "/admin/metrics", &admin).text());
    assert_eq!(gauge(&m, "kframe_registry_listener_connected"), 0.0, "still cut");
    assert!(polls(&addrs[1]) > polls_before, "the poll brought it");
    let r = complete(&addrs[1], &key, &format!("{first} user: and now?"), Some(&sessions[0]));
    assert_eq!(r.status, 200, "{}", r.text());

    // Concurrent re-keys through all three: strictly increasing per caller, none
    // lost, none repeated.
    let threads: Vec<_> = addrs
        .iter()
        .cloned()
        .map(|addr| {
            let admin = admin.clone();
            std::thread::spawn(move || {
                (0..5)
                    .map(|_| {
                        let r = post_to(&addr, "/admin/tenants/alice/rekey", &admin, &json!({}));
                        assert_eq!(r.status, 200, "{}", r.text());
                        r.json()["epoch"].as_u64().unwrap()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in threads {
        let mine = t.join().unwrap();
        assert!(mine.windows(2).all(|w| w[0] < w[1]), "{mine:?}");
        all.extend(mine);
    }
    all.sort();
    assert_eq!(all, (3..=17).collect::<Vec<u64>>());
    assert_eq!(
        c.pg.sql("SELECT string_agg(epoch::text, ',' ORDER BY epoch) FROM key_epochs"),
        (0..=17).map(|e| e.to_string()).collect::<Vec<_>>().join(",")
    );
    for addr in &addrs {
        wait_for(Duration::from_secs(10), "epoch 17 everywhere", || epoch_on(addr, &admin, "alice") == Some(17));
    }
}

#[test]
fn postgres_stopped_and_restarted_known_tenants_keep_working_and_writes_get_a_clear_503_then_resume() {
    let c = Cluster::start([&[], &[], &[]]);
    let admin = c.admin();
    let addrs: Vec<String> = (0..3).map(|i| c.replica(i).addr.clone()).collect();
    let (_, key) = create(&addrs[0], &admin, "alice");
    for addr in &addrs {
        wait_for(Duration::from_secs(10), "alice everywhere", || get(addr, "/v1/models", &key).status == 200);
    }
    c.pg.stop();
    for addr in &addrs {
        let r = complete(addr, &key, "user: still there?", None);
        assert_eq!(r.status, 200, "known tenants are served from each replica's cache: {}", r.text());
        let refused = post_to(addr, "/admin/tenants", &admin, &json!({"name": "bob"}));
        assert_eq!(refused.status, 503, "{}", refused.text());
        assert!(refused.text().contains("unavailable"), "{}", refused.text());
        let rekey = post_to(addr, "/admin/tenants/alice/rekey", &admin, &json!({}));
        assert_eq!(rekey.status, 503, "{}", rekey.text());
    }
    // A policy the registry could not record is not run either: replicas agree.
    let lfu = std::fs::read(kframe_policy::shipped("lfu")).expect("built by scripts/build-plugins.sh");
    let put = request_to(&addrs[0], "PUT", "/admin/policies/eviction?name=lfu", Some(&admin), &[], &lfu);
    assert_eq!(put.status, 503, "{}", put.text());
    let policies = get(&addrs[0], "/admin/policies", &admin).json();
    assert!(policies["policies"][1]["component"].is_null(), "{policies}");
    c.pg.start_again();
    wait_for(Duration::from_secs(20), "writes to resume", || {
        post_to(&addrs[1], "/admin/tenants", &admin, &json!({"name": "bob"})).status == 201
    });
    // Nothing half-written: alice at epoch 0, bob once, two epochs in all.
    assert_eq!(c.pg.sql("SELECT string_agg(name || ':' || epoch, ',' ORDER BY id) FROM tenants"), "alice:0,bob:0");
    assert_eq!(c.pg.sql("SELECT count(*) FROM key_epochs"), "2");
    let v: Value = post_to(&addrs[2], "/admin/tenants/alice/rekey", &admin, &json!({})).json();
    assert_eq!(v["epoch"], 1);
}

/// The Python of the environment scripts/test.sh sets up, and a tool beside it.
fn pyenv_tool(name: &str) -> PathBuf {
    let python = std::env::var_os("KFRAME_TEST_PYTHON").expect("KFRAME_TEST_PYTHON (scripts/test.sh sets it)");
    Path::new(&python).with_file_name(name)
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// Checks the InferencePool of a kustomize build against the CRD's schema, and
/// that it selects the replicas' pods on their port.
const CHECK_POOL: &str = r#"
import sys, yaml, jsonschema
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
crd = [d for d in yaml.safe_load_all(open(sys.argv[2])) if d][0]
schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
pools = [d for d in docs if d["kind"] == "InferencePool"]
assert len(pools) == 1, pools
pool = pools[0]
jsonschema.validate(pool, schema)
deploy = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "kframe")
labels = deploy["spec"]["template"]["metadata"]["labels"]
assert all(labels.get(k) == v for k, v in pool["spec"]["selector"]["matchLabels"].items()), (labels, pool)
ports = [p["containerPort"] for c in deploy["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])]
assert all(t["number"] in ports for t in pool["spec"]["targetPorts"]), (ports, pool)
bad = dict(pool, spec=dict(pool["spec"], targetPorts=[]))
try:
    jsonschema.validate(bad, schema)
    sys.exit("a pool without target ports passed the schema")
except jsonschema.ValidationError:
    pass
print("inferencepool ok")
"#;

#[test]
fn the_kubernetes_manifests_build_with_kustomize_and_validate_offline() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/cluster/kubernetes");
    let tmp = tempfile::tempdir().unwrap();
    let built = tmp.path().join("built.yaml");
    let yaml = run_ok(Command::new(pyenv_tool("kubectl")).arg("kustomize").arg(&dir));
    std::fs::write(&built, &yaml).unwrap();
    for kind in ["Deployment", "Service", "StatefulSet", "ConfigMap", "InferencePool", "Namespace"] {
        assert!(yaml.contains(&format!("kind: {kind}\n")), "{kind} missing from the build");
    }
    let report = run_ok(Command::new(pyenv_tool("kubernetes-validate")).arg("--strict").arg(&built));
    for resource in
        ["deployment/kframe ", "deployment/kframe-router", "statefulset/kframe-postgres", "service/kframe-replicas"]
    {
        assert!(report.contains(&format!("passed for resource {resource}")), "{resource}:\n{report}");
    }
    assert!(!report.contains("failed"), "{report}");
    let out = run_ok(
        Command::new(pyenv_tool("python"))
            .arg("-c")
            .arg(CHECK_POOL)
            .arg(&built)
            .arg(dir.join("crd/inferencepools.yaml")),
    );
    assert!(out.contains("inferencepool ok"), "{out}");
    // Both HAProxy configurations parse.
    run_ok(Command::new(haproxy()).arg("-c").arg("-f").arg(dir.join("haproxy.cfg")));
    let shipped = dir.join("../haproxy.cfg");
    run_ok(
        Command::new(haproxy())
            .args(["-c", "-f"])
            .arg(shipped)
            .env("KFRAME_LISTEN", "127.0.0.1:1")
            .envs(NAMES.iter().map(|n| (format!("KFRAME_REPLICA_{}", n.to_uppercase()), "127.0.0.1:2"))),
    );
}
