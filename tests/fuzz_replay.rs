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
