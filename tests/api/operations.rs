//! Running the real binary as an operator does: log rotation's `SIGHUP`, and settings it must
//! refuse before it starts.

use crate::common::{Api, Binary, Home, eventually};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Run a command to its end, failing (not hanging the suite) if it has not ended in 30 s.
pub fn run_bounded(mut cmd: Command) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary runs");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the command did not end in 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn signal(server: &Binary, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(server.child.id()).unwrap();
    // SAFETY: kill only sends a signal to our own child.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill");
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test]
async fn sighup_reopens_the_auth_log_and_the_server_keeps_serving() {
    use std::os::unix::fs::PermissionsExt;
    let home = Home::new("");
    let mut server = home.spawn_binary();
    let logs = home.path().join("logs");
    let log = logs.join("auth.log");
    let reopened = |text: &str| text.matches("reopened the auth log").count();
    for round in 0..3 {
        // What logrotate does: move the file away, then signal.
        let rotated = logs.join(format!("auth.log.{round}"));
        std::fs::rename(&log, &rotated).unwrap();
        signal(&server, libc::SIGHUP);
        eventually(Duration::from_secs(10), || async {
            (reopened(&read(&log)) == 1).then_some(())
        })
        .await;
        let mode = std::fs::metadata(&log).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "round {round}: the new log is owner-only");
        // Still serving; new events go to the new file, none to the old one.
        let r = server
            .post(
                "/v0/management/auths",
                &format!(r#"{{"provider": "openai", "token": "sk-hup-{round}"}}"#),
            )
            .await;
        assert_eq!(r.status, 201, "round {round}: {}", r.text);
        let id = r.json()["id"].as_str().unwrap().to_string();
        eventually(Duration::from_secs(10), || async {
            read(&log).contains(&id).then_some(())
        })
        .await;
        assert!(!read(&rotated).contains(&id), "round {round}");
        assert!(server.child.try_wait().unwrap().is_none(), "round {round}");
    }
    // Nothing rotated: the same file goes on, with what it had.
    let before = read(&log);
    for n in 2..4 {
        signal(&server, libc::SIGHUP);
        let after = eventually(Duration::from_secs(10), || async {
            let text = read(&log);
            (reopened(&text) == n).then_some(text)
        })
        .await;
        assert!(after.starts_with(&before));
    }
    assert_eq!(server.auths().await.len(), 3);
    // SIGTERM still stops it cleanly.
    signal(&server, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the server did not stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(0));
}

#[test]
fn unknown_log_levels_stop_the_binary_with_exit_2() {
    let bad = [
        "verbose",
        "",
        "info,loud",
        "=debug",
        "debug=",
        "warning",
        "x=verbose",
    ];
    for level in bad {
        let home = Home::new(&format!("logging:\n  level: \"{level}\"\n"));
        let out = run_bounded(home.command(&[], &[]));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{level:?}: {stderr}");
        assert!(stderr.contains("logging.level"), "{level:?}: {stderr}");
    }
    for level in ["verbose", "info,x=loud"] {
        let home = Home::new("");
        let out = run_bounded(home.command(&[], &[("CLIPROXY__LOGGING__LEVEL", level)]));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{level:?}: {stderr}");
        assert!(stderr.contains("logging.level"), "{level:?}: {stderr}");
    }
}
