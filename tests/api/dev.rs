//! `linkid dev`: a throwaway server for local development, one command.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

/// A running `linkid dev`, with what it printed on stdout.
pub struct Dev {
    child: Child,
    pub api: String,
    pub token: Option<String>,
    pub data: PathBuf,
    pub stdout: Arc<Mutex<String>>,
    log: Arc<Mutex<String>>,
}

impl Dev {
    /// Starts `linkid dev ARGS` in `cwd` with its temporary directory in
    /// `tmp`, and waits for the line that says where its data is.
    pub fn start(cwd: &Path, tmp: &Path, args: &[&str], env: &[(&str, &str)]) -> Dev {
        let mut command = crate::cli::command(cwd);
        command
            .env("TMPDIR", tmp)
            .env("LINKID_SERVER__ADDR", "127.0.0.1:0")
            .arg("dev")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("the binary starts");
        let stdout = Arc::new(Mutex::new(String::new()));
        let log = Arc::new(Mutex::new(String::new()));
        let (lines_tx, lines_rx) = mpsc::channel::<String>();
        {
            let out = child.stdout.take().unwrap();
            let stdout = stdout.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    stdout.lock().unwrap().push_str(&format!("{line}\n"));
                    let _ = lines_tx.send(line);
                }
            });
        }
        {
            let err = child.stderr.take().unwrap();
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    log.lock().unwrap().push_str(&format!("{line}\n"));
                }
            });
        }
        let (mut api, mut token, mut data) = (None, None, None);
        let deadline = Instant::now() + Duration::from_secs(30);
        while data.is_none() || api.is_none() {
            let Ok(line) =
                lines_rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            else {
                panic!(
                    "linkid dev did not print its API and data lines:\nstdout:\n{}\nlog:\n{}",
                    stdout.lock().unwrap(),
                    log.lock().unwrap()
                );
            };
            if let Some(rest) = line.strip_prefix("API=") {
                api = Some(rest.to_owned());
            } else if let Some(rest) = line.strip_prefix("TOKEN=") {
                token = Some(rest.to_owned());
            } else if let Some(rest) = line.strip_prefix("data: ") {
                data = Some(PathBuf::from(rest.split(" (").next().unwrap()));
            }
        }
        // The token, when printed, follows the API line.
        if args.contains(&"--print-token") && token.is_none() {
            let line = lines_rx.recv_timeout(Duration::from_secs(10)).unwrap();
            token = line.strip_prefix("TOKEN=").map(str::to_owned);
        }
        Dev {
            child,
            api: api.unwrap(),
            token,
            data: data.unwrap(),
            stdout,
            log,
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit after a signal.
    fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader threads drain the pipes.
                std::thread::sleep(Duration::from_millis(100));
                return status;
            }
            assert!(Instant::now() < deadline, "linkid dev did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn get(url: &str, token: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test]
async fn dev_prints_a_working_admin_token_and_sigterm_removes_its_data_and_exits_0() {
    let cwd = TempDir::new().unwrap();
    let tmp = TempDir::new().unwrap();
    let mut dev = Dev::start(cwd.path(), tmp.path(), &["--print-token"], &[]);
    let token = dev.token.clone().expect("--print-token prints the token");

    let providers = get(&format!("{}/users/identity-providers", dev.api), &token).await;
    let linked = reqwest::Client::new()
        .post(format!("{}/users/u-42/linked-identities", dev.api))
        .bearer_auth(&token)
        .json(&serde_json::json!({"provider_id": "okta", "linked_user_id": "00u1", "linked_username": "ada"}))
        .send()
        .await
        .unwrap();

    assert_eq!(providers.status(), 200);
    assert_eq!(linked.status(), 201);
    assert!(
        dev.data.starts_with(tmp.path()),
        "{:?} is under TMPDIR",
        dev.data
    );
    let mut files = entries(&dev.data);
    files.sort();
    assert!(
        files.contains(&"linkid.db".to_string()) && files.contains(&"root.key".to_string()),
        "{files:?}"
    );
    assert!(
        entries(cwd.path()).is_empty(),
        "nothing is written in the working directory"
    );

    dev.signal("TERM");
    let status = dev.wait();

    assert!(status.success(), "{status:?}: {}", dev.log());
    assert!(!dev.data.exists(), "the temporary data is removed");
    assert!(entries(tmp.path()).is_empty(), "{:?}", entries(tmp.path()));
    let log = dev.log();
    assert!(
        !log.contains(&token),
        "the token never reaches the log: {log}"
    );
    assert!(
        log.contains(dev.data.to_str().unwrap()),
        "the log says where the data is: {log}"
    );
}

#[tokio::test]
async fn ctrl_c_stops_dev_removes_its_data_and_exits_0() {
    let cwd = TempDir::new().unwrap();
    let tmp = TempDir::new().unwrap();
    let mut dev = Dev::start(cwd.path(), tmp.path(), &["--print-token"], &[]);
    assert_eq!(
        get(
            &format!("{}/users/identity-providers", dev.api),
            dev.token.as_ref().unwrap()
        )
        .await
        .status(),
        200
    );

    dev.signal("INT");
    let status = dev.wait();

    assert!(status.success(), "{status:?}: {}", dev.log());
    assert!(entries(tmp.path()).is_empty(), "{:?}", entries(tmp.path()));
}

#[tokio::test]
async fn dev_loads_fixtures_and_reads_the_same_config_as_serve() {
    let cwd = TempDir::new().unwrap();
    let tmp = TempDir::new().unwrap();
    std::fs::write(
        cwd.path().join("config.toml"),
        "[[identity_providers]]\nid = \"github\"\ndisplay_name = \"GitHub\"\nprotocol = \"OIDC\"\n",
    )
    .unwrap();
    std::fs::write(
        cwd.path().join("links.jsonl"),
        concat!(
            r#"{"user_id":"u-1","provider_id":"github","linked_user_id":"gh-1","linked_username":"ada","created_at":"2026-01-02T03:04:05Z","updated_at":"2026-01-02T03:04:05Z"}"#,
            "\n",
            r#"{"user_id":"u-2","provider_id":"github","linked_user_id":"gh-2","linked_username":"grace"}"#,
            "\n"
        ),
    )
    .unwrap();

    let dev = Dev::start(
        cwd.path(),
        tmp.path(),
        &["--print-token", "--fixtures", "links.jsonl"],
        &[],
    );
    let token = dev.token.clone().unwrap();

    let providers: Value = get(&format!("{}/users/identity-providers", dev.api), &token)
        .await
        .json()
        .await
        .unwrap();
    let links: Value = get(&format!("{}/users/u-1/linked-identities", dev.api), &token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(providers["identity_providers"][0]["provider_id"], "github");
    assert_eq!(links["linked_identities"][0]["linked_user_id"], "gh-1");
    assert_eq!(
        links["linked_identities"][0]["created_at"],
        "2026-01-02T03:04:05Z"
    );
}

#[test]
fn bad_fixtures_stop_dev_naming_each_line_and_leave_nothing_behind() {
    let cwd = TempDir::new().unwrap();
    let tmp = TempDir::new().unwrap();
    std::fs::write(
        cwd.path().join("links.jsonl"),
        "{\"user_id\":\"u-1\",\"provider_id\":\"nowhere\",\"linked_user_id\":\"x\",\"linked_username\":\"y\"}\nnot json\n",
    )
    .unwrap();

    let output = crate::cli::output_within(
        {
            let mut command = crate::cli::command(cwd.path());
            command
                .env("TMPDIR", tmp.path())
                .env("LINKID_SERVER__ADDR", "127.0.0.1:0")
                .args(["dev", "--print-token", "--fixtures", "links.jsonl"]);
            command
        },
        Duration::from_secs(30),
    );

    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("line 1: provider_id"), "{stderr}");
    assert!(stderr.contains("line 2"), "{stderr}");
    assert!(!String::from_utf8_lossy(&output.stdout).contains("TOKEN="));
    assert!(entries(tmp.path()).is_empty(), "{:?}", entries(tmp.path()));
}

#[tokio::test]
async fn dev_with_data_keeps_the_key_and_links_for_the_next_run() {
    let cwd = TempDir::new().unwrap();
    let tmp = TempDir::new().unwrap();
    let data = cwd.path().join("dev-data");
    let mut first = Dev::start(
        cwd.path(),
        tmp.path(),
        &["--print-token", "--data", "dev-data"],
        &[],
    );
    let token = first.token.clone().unwrap();
    let linked = reqwest::Client::new()
        .post(format!("{}/users/u-9/linked-identities", first.api))
        .bearer_auth(&token)
        .json(&serde_json::json!({"provider_id": "okta", "linked_user_id": "00u9", "linked_username": "nine"}))
        .send()
        .await
        .unwrap();
    assert_eq!(linked.status(), 201);
    assert_eq!(first.data, data.canonicalize().unwrap());
    first.signal("INT");
    assert!(first.wait().success());
    assert!(data.join("linkid.db").exists() && data.join("root.key").exists());

    let second = Dev::start(cwd.path(), tmp.path(), &["--data", "dev-data"], &[]);
    let links: Value = get(
        &format!("{}/users/u-9/linked-identities", second.api),
        &token,
    )
    .await
    .json()
    .await
    .unwrap();

    assert_eq!(links["linked_identities"][0]["linked_user_id"], "00u9");
    assert!(
        entries(tmp.path()).is_empty(),
        "--data makes nothing under TMPDIR"
    );
}

#[test]
fn without_a_terminal_or_print_token_dev_prints_no_token_but_says_how_to_mint_one() {
    let cwd = TempDir::new().unwrap();
    let tmp = TempDir::new().unwrap();

    let dev = Dev::start(cwd.path(), tmp.path(), &[], &[]);
    std::thread::sleep(Duration::from_millis(300));

    let stdout = dev.stdout.lock().unwrap().clone();
    assert!(dev.token.is_none(), "{stdout}");
    assert!(!stdout.contains("TOKEN="), "{stdout}");
    assert!(stdout.contains("--print-token"), "{stdout}");
    let key = dev.data.join("root.key");
    assert!(
        stdout.contains(&format!("LINKID_AUTH__PRIVATE_KEY_FILE={}", key.display())),
        "{stdout}"
    );
}
