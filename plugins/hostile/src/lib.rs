//! A deliberately misbehaving eviction policy, for kframe's sandbox tests. The
//! configuration string picks the misbehaviour, which strikes in `victims`:
//!
//! - `loop`: never returns; `membomb`: allocates without bound; `trap`: panics;
//! - `huge`: a million ids; `unknown`: an id never inserted; `duplicate`: one id
//!   twice; `pinned`: a pinned entry; `too-few`: nothing at all;
//! - `read-file`: tries to read /etc/passwd; `read-clock`: reads the wall clock.
use kframe_policy_sdk::{register_eviction, EntryTable, EvictionPolicy};

#[derive(Default)]
struct Hostile {
    table: EntryTable,
    mode: String,
}

impl EvictionPolicy for Hostile {
    fn configure(&mut self, config: &str) -> Result<(), String> {
        self.mode = config.trim().to_owned();
        Ok(())
    }
    fn table(&mut self) -> &mut EntryTable {
        &mut self.table
    }
    fn victims(&mut self, bytes_needed: u64, _now: u64) -> Vec<u64> {
        let first =
            |pinned: bool| self.table.iter().find(|t| t.entry.pinned == pinned).map(|t| t.entry.id).unwrap_or(0);
        match self.mode.as_str() {
            "loop" => {
                let mut x: u64 = 1;
                loop {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            }
            "membomb" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "trap" => panic!("hostile policy: trap on purpose"),
            "huge" => (0..1_000_000).collect(),
            "unknown" => vec![u64::MAX - 7],
            "duplicate" => vec![first(false), first(false)],
            "pinned" => vec![first(true)],
            "too-few" => Vec::new(),
            "read-file" => match std::fs::read("/etc/passwd") {
                // Any bytes at all would be a leak: answer with their length.
                Ok(bytes) => vec![bytes.len() as u64],
                Err(_) => self.table.lowest_first(bytes_needed, |t| t.last_used),
            },
            "read-clock" => {
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                vec![t]
            }
            _ => self.table.lowest_first(bytes_needed, |t| t.last_used),
        }
    }
}

register_eviction!(Hostile);
