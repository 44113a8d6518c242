//! The man page and shell completions generated from the command line are committed (the
//! Debian package installs them); this fails when a flag changed and they were not
//! regenerated with `cargo run -p ramnbd --example gen-docs`.

mod generated;

#[test]
fn man_page_and_completions_are_current() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut stale = Vec::new();
    for (path, contents) in generated::files() {
        match std::fs::read(root.join(path)) {
            Ok(committed) if committed == contents => {}
            Ok(_) => stale.push(format!("{path} differs")),
            Err(err) => stale.push(format!("{path}: {err}")),
        }
    }
    assert!(
        stale.is_empty(),
        "generated files are stale ({}): run `cargo run -p ramnbd --example gen-docs` and commit",
        stale.join(", ")
    );
}

/// The man page documents every long flag (a check on the generator, not only on freshness).
#[test]
fn man_page_names_every_flag() {
    use clap::CommandFactory;
    let (_, man) = generated::files().remove(0);
    let man = String::from_utf8(man).unwrap();
    for arg in ramnbd::cli::Cli::command().get_arguments() {
        if let Some(long) = arg.get_long() {
            // roff escapes the dashes: \-\-long\-name
            let escaped = format!("\\-\\-{}", long.replace('-', "\\-"));
            assert!(man.contains(&escaped), "ramnbd.8 lacks --{long}");
        }
    }
}
