//! Shared invariant checks for keyhole's fuzz targets. The same file is
//! compiled into `tests/fuzz_corpus.rs`, which replays the committed corpora
//! on the stable toolchain.

pub mod checks;
pub mod harness;
