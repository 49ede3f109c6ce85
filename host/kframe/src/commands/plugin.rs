//! `kframe plugin check`: which world each component implements, or why it is
//! rejected, after every check possible before it serves.

use crate::args::PluginCommand;
use kframe_policy::{check, Limits, PluginRuntime};

pub fn run(cmd: PluginCommand) -> anyhow::Result<()> {
    let PluginCommand::Check { files, config, deadline_ms } = cmd;
    let limits = Limits { deadline: std::time::Duration::from_millis(deadline_ms), ..Limits::default() };
    let runtime = PluginRuntime::new(limits, None)?;
    let mut rejected = 0;
    for file in &files {
        let name = file.display().to_string();
        let outcome = std::fs::read(file)
            .map_err(|e| e.to_string())
            .and_then(|bytes| check::validate(&runtime, &name, &bytes, &config).map_err(|e| e.failure.to_string()));
        match outcome {
            Ok(kind) => println!("{name}: ok, implements {kind} ({})", kind.package()),
            Err(reason) => {
                rejected += 1;
                println!("{name}: rejected: {reason}");
            }
        }
    }
    if rejected > 0 {
        anyhow::bail!("{rejected} of {} components rejected", files.len());
    }
    Ok(())
}
