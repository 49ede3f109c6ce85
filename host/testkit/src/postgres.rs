//! A throwaway PostgreSQL server for tests: its own cluster in a temporary
//! directory, on a free loopback port and a private socket directory, stopped
//! and removed when the value drops.
//!
//! initdb refuses to run as root, so when the tests run as root (as CI does)
//! every PostgreSQL command runs as the `postgres` user, which then owns the
//! directory. The binaries come from `KFRAME_PG_BIN`, else the newest
//! `/usr/lib/postgresql/<version>/bin`, else `PATH`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tempfile::TempDir;

pub struct Postgres {
    dir: TempDir,
    bin: PathBuf,
    as_postgres: bool,
    pub port: u16,
}

impl Postgres {
    /// initdb, then start on a free port; panics with PostgreSQL's log if it cannot.
    pub fn start() -> Self {
        let bin = binaries();
        let dir = tempfile::Builder::new().prefix("kframe-pg-").tempdir().expect("a temporary directory");
        let as_postgres = is_root();
        if as_postgres {
            run(Command::new("chown").arg("-R").arg("postgres:postgres").arg(dir.path()));
        }
        let port = free_port();
        let pg = Self { dir, bin, as_postgres, port };
        let initdb = pg
            .command("initdb")
            .args(["-A", "trust", "-U", "kframe", "-E", "UTF8", "--no-sync", "-D"])
            .arg(pg.data())
            .output();
        check("initdb", initdb);
        pg.start_again();
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    /// The url a kframe replica is given.
    pub fn url(&self) -> String {
        format!("postgres://kframe@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server (again, after [`stop`](Self::stop)) and waits until it accepts connections.
    pub fn start_again(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("postgres.log"))
            .args(["-w", "-t", "60", "-o", &options, "start"])
            .output();
        if !out.as_ref().is_ok_and(|o| o.status.success()) {
            let log = std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default();
            panic!("pg_ctl start failed: {out:?}\n{log}");
        }
    }

    /// A fast shutdown: open connections are closed, committed data kept.
    pub fn stop(&self) {
        let out = self.command("pg_ctl").arg("-D").arg(self.data()).args(["-w", "-m", "fast", "stop"]).output();
        check("pg_ctl stop", out);
    }

    /// Runs `sql` through psql and returns its unaligned, tuples-only output.
    pub fn sql(&self, sql: &str) -> String {
        let out = self
            .command("psql")
            .args([
                "-X",
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-U",
                "kframe",
                "-d",
                "postgres",
            ])
            .args(["-p", &self.port.to_string(), "-c", sql])
            .output();
        let out = check("psql", out);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.command("pg_ctl").arg("-D").arg(self.data()).args(["-w", "-m", "immediate", "stop"]).output();
    }
}

fn binaries() -> PathBuf {
    if let Some(dir) = std::env::var_os("KFRAME_PG_BIN") {
        return dir.into();
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).unwrap_or_default()
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// A port nothing listens on now (the kernel's pick, released at once).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

fn run(c: &mut Command) {
    check("command", c.output());
}

fn check(what: &str, out: std::io::Result<Output>) -> Output {
    match out {
        Ok(o) if o.status.success() => o,
        Ok(o) => panic!(
            "{what} failed ({}):\n{}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("{what}: {e} (is PostgreSQL installed? set KFRAME_PG_BIN to its bin directory)"),
    }
}
