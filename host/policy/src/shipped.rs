//! Where the plugins kframe ships are found on disk.

/// Where the shipped plugins are found: `$KFRAME_PLUGIN_DIR`, else the
/// wasm32-wasip2 release folder beside the running binary's target folder, else
/// the workspace's.
pub fn shipped_dir() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("KFRAME_PLUGIN_DIR") {
        return dir.into();
    }
    let beside_exe = std::env::current_exe().ok().and_then(|exe| {
        // target/{release,debug}/kframe or target/debug/deps/test-binary
        exe.ancestors().find(|p| p.file_name().is_some_and(|n| n == "target")).map(|t| t.join("wasm32-wasip2/plugin"))
    });
    match beside_exe {
        Some(dir) if dir.is_dir() => dir,
        _ => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/wasm32-wasip2/plugin"),
    }
}

/// The path of a shipped plugin by its short name (`lru`, `verify-all`, ...).
pub fn shipped(name: &str) -> std::path::PathBuf {
    shipped_dir().join(format!("kframe_{}.wasm", name.replace('-', "_")))
}
