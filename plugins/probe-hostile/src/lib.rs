//! A deliberately misbehaving adversary, for kframe's sandbox tests. The
//! configuration string picks the misbehaviour, which strikes in `attack`:
//! `loop` never returns, `trap` panics, `membomb` allocates without bound,
//! `garbage` answers with the wrong number of tokens, `read-file` tries to read
//! /etc/passwd. Anything else guesses token 0 everywhere.
use kframe_policy_sdk::{register_adversary, About, Adversary, Guess, Task, View};

#[derive(Default)]
struct Hostile {
    mode: String,
}

impl Adversary for Hostile {
    fn configure(&mut self, config: &str) -> Result<(), String> {
        self.mode = config.trim().to_owned();
        Ok(())
    }

    fn about(&self) -> About {
        About { name: format!("probe-hostile:{}", self.mode), tasks: vec![Task::Reconstruct] }
    }

    fn attack(&mut self, view: View) -> Result<Guess, String> {
        match self.mode.as_str() {
            "loop" => {
                let mut x: u64 = 1;
                loop {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            }
            "trap" => panic!("hostile adversary: trap on purpose"),
            "membomb" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "garbage" => Ok(Guess::Tokens(vec![0; view.positions.len() + 3])),
            "read-file" => match std::fs::read("/etc/passwd") {
                Ok(bytes) => Ok(Guess::Tokens(vec![bytes.len() as u32; view.positions.len()])),
                Err(e) => Err(e.to_string()),
            },
            _ => Ok(Guess::Tokens(vec![0; view.positions.len()])),
        }
    }
}

register_adversary!(Hostile);
