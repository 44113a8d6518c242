//! Puts the commit this binary is built from into `ramnbd --version`: `RAMNBD_VERSION` is
//! "0.1.0 (commit 1a2b3c4d5e6f)", with "-dirty" when the tree had uncommitted changes. Without
//! git or a repository (a source tarball, `cargo package`), `RAMNBD_COMMIT` from the
//! environment is used if set, else "0.1.0 (commit unknown)".

use std::process::Command;

fn main() {
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    let commit = std::env::var("RAMNBD_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(git_commit)
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=RAMNBD_VERSION={version} (commit {commit})");
    println!("cargo:rerun-if-env-changed=RAMNBD_COMMIT");
    // Rebuild when HEAD moves (a commit, a checkout) or the index changes (dirty or not).
    if let Some(git_dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        println!("cargo:rerun-if-changed={git_dir}/HEAD");
        println!("cargo:rerun-if-changed={git_dir}/index");
        // The branch's ref file moves on a commit (a worktree's HEAD names it, its file
        // lives in the common git directory).
        let branch =
            git(&["symbolic-ref", "-q", "HEAD"]).zip(git(&["rev-parse", "--git-common-dir"]));
        if let Some((head_ref, common)) = branch {
            let common = std::env::current_dir().unwrap_or_default().join(common);
            println!("cargo:rerun-if-changed={}", common.join(head_ref).display());
        }
    }
}

fn git_commit() -> Option<String> {
    let hash = git(&["rev-parse", "--short=12", "HEAD"])?;
    let dirty = Command::new("git")
        .args(["diff-index", "--quiet", "HEAD", "--"])
        .status()
        .map(|s| !s.success())
        .unwrap_or(false);
    Some(if dirty { format!("{hash}-dirty") } else { hash })
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}
