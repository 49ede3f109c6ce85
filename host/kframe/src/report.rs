//! How a command prints a report.

/// One JSON object with `--json`, else the report's text.
pub fn print_report(report: &impl serde::Serialize, json: bool, text: String) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{text}");
    }
    Ok(())
}
