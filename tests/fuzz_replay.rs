//! Replays every committed fuzz corpus file (fuzz/corpus/<target>/) through the same target
//! functions the libFuzzer targets run (`api_guard::fuzzing`): a regression check that takes
//! seconds, so a crash once found and added to the corpus stays fixed. `make fuzz` explores;
//! this only re-runs what is committed (docs/FUZZING.md).

use std::path::Path;

#[test]
fn every_committed_fuzz_input_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (name, target) in api_guard::fuzzing::TARGETS {
        let dir = root.join(name);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (every target has a corpus)", dir.display()))
            .map(|e| e.expect("a directory entry").path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{}: empty corpus", dir.display());
        for f in &files {
            let data = std::fs::read(f).expect("a corpus file");
            // Name the input when its target panics, so the failure points at the file.
            let r = std::panic::catch_unwind(|| target(&data));
            assert!(r.is_ok(), "fuzz target {name} fails on {}", f.display());
        }
    }
}

/// `make test` never builds the libFuzzer workspace (fuzz/ is its own, and slow to build), so
/// this checks its entry points as text: each `fuzz/fuzz_targets/<name>.rs` calls the target
/// function of the same name, every target (filter and quota service) has one, and each has a
/// `[[bin]]` in fuzz/Cargo.toml. A broken entry point once landed unnoticed this way.
#[test]
fn every_fuzz_entry_point_calls_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("fuzz/Cargo.toml");
    // The quota service's target names (quota/src/fuzzing.rs), kept here as text because the
    // filter's tests do not link the service.
    let quota_src =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("quota/src/fuzzing.rs"))
            .expect("quota/src/fuzzing.rs");
    let mut expected: Vec<(String, &str)> = api_guard::fuzzing::TARGETS
        .iter()
        .map(|(n, _)| (n.to_string(), "api_guard"))
        .collect();
    let table = quota_src
        .split("pub const TARGETS")
        .nth(1)
        .and_then(|t| t.split("];").next())
        .expect("quota/src/fuzzing.rs has a TARGETS table");
    for name in table.split('"').skip(1).step_by(2) {
        expected.push((name.to_string(), "api_guard_quota"));
    }
    let mut files: Vec<String> = std::fs::read_dir(root.join("fuzz_targets"))
        .expect("fuzz/fuzz_targets")
        .map(|e| {
            e.expect("a directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    files.sort();
    let mut want: Vec<String> = expected.iter().map(|(n, _)| format!("{n}.rs")).collect();
    want.sort();
    assert_eq!(
        files, want,
        "fuzz/fuzz_targets/ and the TARGETS tables differ"
    );
    for (name, krate) in &expected {
        let src = std::fs::read_to_string(root.join("fuzz_targets").join(format!("{name}.rs")))
            .expect("an entry point");
        let call = format!("{krate}::fuzzing::{name}(data)");
        assert!(
            src.contains(&call),
            "fuzz/fuzz_targets/{name}.rs does not call {call}"
        );
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "fuzz/Cargo.toml has no [[bin]] named {name}"
        );
    }
}
