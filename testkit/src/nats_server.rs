//! A private `nats-server` started by a test with its own configuration (authentication, TLS), on a
//! port the server picks, stopped when dropped.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `nats-server`; killed on drop.
#[derive(Debug)]
pub struct NatsServer {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl NatsServer {
    /// Starts `nats-server` (from `PATH`) with `config` (nats-server configuration text, without
    /// `port`/`listen`, which are set here to loopback and a free port) and waits until it accepts
    /// clients.
    ///
    /// # Panics
    /// When `nats-server` is not installed or does not start within 10 s: tests never skip.
    pub fn start(config: &str) -> NatsServer {
        let dir = std::env::temp_dir().join(crate::unique_name("natsd"));
        std::fs::create_dir_all(&dir).expect("nats-server directory");
        let path = dir.join("nats.conf");
        std::fs::write(&path, format!("listen: \"127.0.0.1:-1\"\n{config}\n"))
            .expect("write nats.conf");
        let mut child = Command::new("nats-server")
            .arg("-c")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start nats-server ({e}): install it (tests never skip)")
            });
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the log until the listening line, then keeps draining it so the server never blocks.
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent {
                    if let Some(port) = line
                        .split("Listening for client connections on ")
                        .nth(1)
                        .and_then(|a| a.trim().rsplit(':').next())
                        .and_then(|p| p.parse::<u16>().ok())
                    {
                        sent = tx.send(Ok(port)).is_ok();
                    } else if line.contains("[FTL]") || line.contains("[ERR]") {
                        sent = tx.send(Err(line)).is_ok();
                    }
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let port = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Ok(port)) => port,
            Ok(Err(line)) => {
                let _ = child.kill();
                panic!("nats-server refused its configuration: {line}");
            }
            Err(_) => {
                let _ = child.kill();
                panic!("nats-server did not start listening within 10 s");
            }
        };
        NatsServer { child, port, dir }
    }

    /// The client port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
