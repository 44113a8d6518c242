//! What `cargo run -p ramnbd --example gen-docs` writes, shared with the test that checks the
//! committed copies are current (tests/generated_docs.rs).

use clap::CommandFactory;
use clap_complete::Shell;

/// Each generated file: its path from the repository root, and its contents.
pub fn files() -> Vec<(&'static str, Vec<u8>)> {
    // The man page carries the release, not the commit: it must not change with every commit.
    let command = || ramnbd::cli::Cli::command().version(env!("CARGO_PKG_VERSION"));
    let mut man = Vec::new();
    clap_mangen::Man::new(command())
        .section("8")
        .manual("System Administration")
        .source(concat!("ramnbd ", env!("CARGO_PKG_VERSION")))
        .render(&mut man)
        .expect("rendering into memory");
    let mut files = vec![("docs/man/ramnbd.8", man)];
    for (shell, path) in [
        (Shell::Bash, "docs/completions/ramnbd.bash"),
        (Shell::Zsh, "docs/completions/_ramnbd"),
        (Shell::Fish, "docs/completions/ramnbd.fish"),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut command(), "ramnbd", &mut out);
        files.push((path, out));
    }
    files
}
