// The README's quick start, executed: every fenced block after a marker
// comment in README.md runs, in order, so a renamed command, flag, route or
// configuration key breaks this test rather than a newcomer's first hour.
//
// The markers (an HTML comment on the line before the block; text after a
// `:` in the comment is for the reader):
//
// - `<!-- ci:run -->`: the block runs with `bash -e` in a scratch directory
//   and must exit 0.
// - `<!-- ci:run start -->`: one command that starts a server (the demo),
//   run in the background with `--listen 127.0.0.1:0` added, until the test
//   ends; the test waits (bounded) for it to print its steps, and at the end
//   stops it with Ctrl-C, which must end it cleanly.
// - `<!-- ci:run demo -->`: the block runs like `ci:run`, against the server
//   the last `start` block started, after a login at it as the README's "A
//   first look" says (its page, the service, "Allow"): its address stands for
//   `127.0.0.1:8080` and the AuthID it showed for `<AuthID>`.
// - `<!-- ci:file NAME -->`: the block is written to NAME in the scratch
//   directory, for the blocks after it (the configuration reference).
//
// In every block `cargo run --release --bin latchkey --` means this build's
// `latchkey`, which is first on PATH (as `latchkey`), and so is a `curl` that
// fails on an HTTP error (`--fail-with-body`), so a block's exit code says
// whether each request worked.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::demo::{Demo, http, login_in_a_browser};

/// How long one block may run.
const BLOCK_BOUND: Duration = Duration::from_secs(120);

/// A marked block of README.md.
#[derive(Debug)]
struct Block {
    /// `run`, `file`.
    marker: String,
    /// The word after the marker (`start`, `demo`, a file name), if any.
    argument: Option<String>,
    /// The README line of the marker.
    line: usize,
    /// The block's text, its indentation removed.
    text: String,
}

/// Every marked block of `readme`, in order.
fn marked_blocks(readme: &str) -> Vec<Block> {
    let lines: Vec<&str> = readme.lines().collect();
    let mut blocks = Vec::new();
    for (at, line) in lines.iter().enumerate() {
        let Some(comment) = line.trim().strip_prefix("<!-- ci:") else { continue };
        let comment = comment.strip_suffix("-->").unwrap_or_else(|| panic!("README.md:{}: one line", at + 1));
        let head = comment.split(':').next().unwrap_or_default();
        let mut words = head.split_whitespace();
        let marker = words.next().unwrap_or_default().to_owned();
        if marker == "test" {
            continue; // .ci/run's: the test command itself.
        }
        assert!(["run", "file"].contains(&marker.as_str()), "README.md:{}: unknown marker ci:{marker}", at + 1);
        let argument = words.next().map(str::to_owned);
        let open = (at + 1..lines.len())
            .find(|&i| !lines[i].trim().is_empty())
            .filter(|&i| lines[i].trim_start().starts_with("```"))
            .unwrap_or_else(|| panic!("README.md:{}: ci:{marker} is not followed by a code block", at + 1));
        let indent = lines[open].len() - lines[open].trim_start().len();
        let close = (open + 1..lines.len())
            .find(|&i| lines[i].trim_start().starts_with("```"))
            .unwrap_or_else(|| panic!("README.md:{}: the block never closes", open + 1));
        let text: String = lines[open + 1..close]
            .iter()
            .map(|l| format!("{}\n", l.get(indent..).unwrap_or_else(|| l.trim_start())))
            .collect();
        blocks.push(Block { marker, argument, line: at + 1, text });
    }
    blocks
}

/// The first `name` on PATH.
fn on_path(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is needed on PATH (scripts/test installs it)"))
}

/// A directory with this build's `latchkey` and a `curl` that fails on HTTP
/// errors, to put first on PATH.
fn bin_dir(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_latchkey"), bin.join("latchkey")).unwrap();
    let curl = bin.join("curl");
    let real = on_path("curl");
    std::fs::write(
        &curl,
        format!("#!/bin/sh\nexec '{}' --fail-with-body --silent --show-error --max-time 30 \"$@\"\n", real.display()),
    )
    .unwrap();
    std::fs::set_permissions(&curl, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

/// A command run the way every block runs: in `work`, with `bin` first on
/// PATH and no `LATCHKEY_*` variables from outside.
fn command(program: &str, work: &Path, bin: &Path) -> Command {
    let mut command = Command::new(program);
    let path = std::env::var_os("PATH").unwrap_or_default();
    let paths = std::iter::once(bin.to_owned()).chain(std::env::split_paths(&path));
    command.current_dir(work).env("PATH", std::env::join_paths(paths).unwrap()).kill_on_drop(true);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("LATCHKEY_") {
            command.env_remove(name);
        }
    }
    command
}

/// The block's text as it runs here.
fn as_run(text: &str) -> String {
    text.replace("cargo run --release --bin latchkey --", "latchkey")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_blocks_marked_runnable_run() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let blocks = marked_blocks(&readme);
    for wanted in ["start", "demo"] {
        assert!(
            blocks.iter().any(|b| b.argument.as_deref() == Some(wanted)),
            "README.md marks no ci:run {wanted} block: {blocks:#?}"
        );
    }
    assert!(blocks.iter().any(|b| b.marker == "run" && b.argument.is_none()), "README.md marks no plain ci:run block");

    let scratch = tempfile::tempdir().unwrap();
    let work = scratch.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let bin = bin_dir(scratch.path());
    let mut server: Option<Demo> = None;
    let http = http();
    for block in &blocks {
        let argument = block.argument.as_deref().map(|a| format!(" {a}")).unwrap_or_default();
        let here = format!("README.md:{} (ci:{}{argument})", block.line, block.marker);
        let mut script = as_run(&block.text);
        match (block.marker.as_str(), block.argument.as_deref()) {
            ("file", Some(name)) => {
                std::fs::write(work.join(name), &block.text).unwrap();
                continue;
            }
            ("run", Some("start")) => {
                let lines: Vec<&str> =
                    script.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
                assert_eq!(lines.len(), 1, "{here}: a start block is one command");
                let mut start = command("bash", &work, &bin);
                start.arg("-c").arg(format!("exec {} --listen 127.0.0.1:0", lines[0]));
                server = Some(Demo::start(start).await);
                continue;
            }
            ("run", Some("demo")) => {
                let demo = server.as_ref().unwrap_or_else(|| panic!("{here}: no ci:run start block before it"));
                let authid = login_in_a_browser(&http, &demo.url, &format!("{}/?type=demo", demo.url)).await;
                let address = demo.url.trim_start_matches("http://");
                script = script.replace("127.0.0.1:8080", address).replace("<AuthID>", &authid);
            }
            ("run", None) => {}
            _ => panic!("{here}: unknown marker"),
        }
        let mut run = command("bash", &work, &bin);
        run.args(["-e", "-c", &script]).stdin(Stdio::null());
        let output = tokio::time::timeout(BLOCK_BOUND, run.output())
            .await
            .unwrap_or_else(|_| panic!("{here} ran over {BLOCK_BOUND:?}"))
            .unwrap();
        assert!(
            output.status.success(),
            "{here} failed ({}):\n{script}\nstdout:\n{}\nstderr:\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            server.as_ref().map(|d| format!("\nthe server's log:\n{}", d.log())).unwrap_or_default(),
        );
    }
    if let Some(demo) = server {
        let status = demo.stop().await;
        assert!(status.success(), "the started server stops cleanly on Ctrl-C: {status:?}");
    }
}
