//! Writes the files generated from the command line (`ramnbd::cli::Cli`): the man page
//! `docs/man/ramnbd.8` and the shell completions in `docs/completions/` (bash, zsh, fish),
//! which are committed and installed by the Debian package. Run after changing a flag:
//!
//!   cargo run -p ramnbd --example gen-docs
//!
//! `cargo test -p ramnbd --test generated_docs` fails while the committed files are stale.

#[path = "../tests/generated/mod.rs"]
mod generated;

fn main() -> std::io::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (path, contents) in generated::files() {
        let path = root.join(path);
        if std::fs::read(&path).ok().as_deref() == Some(contents.as_slice()) {
            println!("{}: current", path.display());
        } else {
            std::fs::write(&path, &contents)?;
            println!("{}: written ({} bytes)", path.display(), contents.len());
        }
    }
    Ok(())
}
