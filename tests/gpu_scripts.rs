//! `scripts/gpu-travel.sh` on a scratch repository laid out like this one: a GPU session untracks
//! the fixtures for its device calls (a call carries 64 MiB; the tracked tree is larger), so
//! `shrink` must leave the files in place and refuse commits, and `restore` must give back
//! exactly the tracked tree it took.

mod common;
use std::path::Path;
use std::process::{Command, Output};

fn run(dir: &Path, program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

fn ok(dir: &Path, program: &str, args: &[&str]) -> String {
    let o = run(dir, program, args);
    assert!(
        o.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        common::stderr(&o)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn tracked(dir: &Path) -> Vec<String> {
    ok(dir, "git", &["ls-files"])
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn the_fixtures_travel_untracked_and_come_back() {
    let dir = common::tmp("gpu-travel");
    let repo = dir.join("repo");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu-travel.sh");
    for (path, bytes) in [
        ("tests/fixtures/tiny/reference/a.safetensors", 1 << 20),
        ("tests/fixtures/extra/b.safetensors", 1 << 19),
        ("tests/fixtures/README.md", 10),
        ("src/lib.rs", 10),
    ] {
        let p = repo.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, vec![b'x'; bytes]).unwrap();
    }
    std::fs::create_dir_all(repo.join("scripts")).unwrap();
    std::fs::copy(&script, repo.join("scripts/gpu-travel.sh")).unwrap();
    ok(&repo, "git", &["init", "-q"]);
    ok(&repo, "git", &["add", "-A"]);
    ok(&repo, "git", &["commit", "-q", "-m", "tree"]);
    let before = tracked(&repo);
    let travel = |carry: &[&str]| {
        let mut args = vec!["scripts/gpu-travel.sh", "size"];
        args.extend_from_slice(carry);
        ok(&repo, "bash", &args)
    };
    assert!(
        travel(&[]).starts_with("1.5 MiB would travel"),
        "{}",
        travel(&[])
    );

    let said = ok(&repo, "bash", &["scripts/gpu-travel.sh", "shrink"]);
    assert!(said.contains("restore before any commit"), "{said}");
    // The fixtures' files stay; the index and `git status` no longer list them.
    let now = tracked(&repo);
    assert!(
        now.iter().all(|p| !p.starts_with("tests/fixtures/tiny/")),
        "{now:?}"
    );
    assert!(
        now.iter().all(|p| !p.starts_with("tests/fixtures/extra/")),
        "{now:?}"
    );
    assert!(now.contains(&"tests/fixtures/README.md".to_string()));
    assert!(repo
        .join("tests/fixtures/tiny/reference/a.safetensors")
        .is_file());
    let untracked = ok(
        &repo,
        "git",
        &["ls-files", "--others", "--exclude-standard"],
    );
    assert_eq!(untracked, "", "the fixtures must be ignored, not untracked");
    assert!(travel(&[]).starts_with("0.0 MiB"), "{}", travel(&[]));
    assert!(
        travel(&["tests/fixtures/tiny"]).starts_with("1.0 MiB"),
        "{}",
        travel(&["tests/fixtures/tiny"])
    );
    // A second shrink changes nothing; no commit lands while shrunk.
    let again = ok(&repo, "bash", &["scripts/gpu-travel.sh", "shrink"]);
    assert!(again.contains("already shrunk"), "{again}");
    let o = run(
        &repo,
        "git",
        &["commit", "-q", "-m", "would drop the fixtures"],
    );
    assert!(!o.status.success());
    assert!(common::stderr(&o).contains("gpu-travel.sh restore"));

    let said = ok(&repo, "bash", &["scripts/gpu-travel.sh", "restore"]);
    assert!(said.contains("restored"), "{said}");
    assert_eq!(tracked(&repo), before);
    assert_eq!(ok(&repo, "git", &["status", "--porcelain"]), "");
    let exclude = std::fs::read_to_string(repo.join(".git/info/exclude")).unwrap();
    assert!(!exclude.contains("gpu-travel"), "{exclude}");
    assert!(!repo.join(".git/hooks/pre-commit").exists());
    ok(
        &repo,
        "git",
        &["commit", "-q", "--allow-empty", "-m", "commits work again"],
    );
}
