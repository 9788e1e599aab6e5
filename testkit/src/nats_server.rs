//! A private `nats-server` started by a test with its own configuration (authentication, TLS, a
//! cluster of several), on a port the server picks, stopped when dropped.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `nats-server`; killed on drop.
#[derive(Debug)]
pub struct NatsServer {
    child: Child,
    port: u16,
    route_port: Option<u16>,
    monitor_port: Option<u16>,
    dir: std::path::PathBuf,
}

/// What the server's log says while it starts.
enum Startup {
    Client(u16),
    Route(u16),
    Monitor(u16),
    Failed(String),
}

/// The port at the end of `line` if it contains `marker` (`... on 127.0.0.1:4222`).
fn port_after(line: &str, marker: &str) -> Option<u16> {
    line.split(marker)
        .nth(1)
        .and_then(|a| a.trim().rsplit(':').next())
        .and_then(|p| p.parse::<u16>().ok())
}

impl NatsServer {
    /// Starts `nats-server` (from `PATH`) with `config` (nats-server configuration text, without
    /// `port`/`listen`, which are set here to loopback and a free port) and waits until it accepts
    /// clients.
    ///
    /// # Panics
    /// When `nats-server` is not installed or does not start within 10 s: tests never skip.
    pub fn start(config: &str) -> NatsServer {
        Self::start_inner(config, false, 0)
    }

    /// [`NatsServer::start`] on a given client `port` of 127.0.0.1: a server started again where a
    /// stopped one listened (its clients reconnect to it).
    ///
    /// # Panics
    /// As [`NatsServer::start`] (also when the port is still taken).
    pub fn start_on(port: u16, config: &str) -> NatsServer {
        Self::start_inner(config, false, port)
    }

    /// Starts one node of a NATS cluster: `config` must have a `cluster { listen: "127.0.0.1:-1" ... }`
    /// block (with `routes` to nodes started before); waits until the node also listens for routes
    /// ([`NatsServer::route_port`]). Add `http: "127.0.0.1:-1"` for [`NatsServer::monitor_port`].
    ///
    /// # Panics
    /// As [`NatsServer::start`].
    pub fn start_cluster_node(config: &str) -> NatsServer {
        Self::start_inner(config, true, 0)
    }

    fn start_inner(config: &str, want_route: bool, port: u16) -> NatsServer {
        let dir = std::env::temp_dir().join(crate::unique_name("natsd"));
        std::fs::create_dir_all(&dir).expect("nats-server directory");
        let path = dir.join("nats.conf");
        let listen = if port == 0 {
            "-1".to_owned()
        } else {
            port.to_string()
        };
        std::fs::write(&path, format!("listen: \"127.0.0.1:{listen}\"\n{config}\n"))
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
        // Reads the log, reporting the ports it names, and keeps draining it so the server never
        // blocks.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let event = if let Some(p) =
                    port_after(&line, "Listening for client connections on ")
                {
                    Startup::Client(p)
                } else if let Some(p) = port_after(&line, "Listening for route connections on ") {
                    Startup::Route(p)
                } else if let Some(p) = port_after(&line, "Starting http monitor on ") {
                    Startup::Monitor(p)
                } else if line.contains("[FTL]") || line.contains("[ERR]") {
                    Startup::Failed(line)
                } else {
                    continue;
                };
                // The receiver is gone once the server is up: keep draining.
                let _ = tx.send(event);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let (mut port, mut route_port, mut monitor_port) = (None, None, None);
        while port.is_none() || (want_route && route_port.is_none()) {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Startup::Client(p)) => port = Some(p),
                Ok(Startup::Route(p)) => route_port = Some(p),
                Ok(Startup::Monitor(p)) => monitor_port = Some(p),
                // An error once clients are served (a route to a node still starting) is not fatal.
                Ok(Startup::Failed(_)) if port.is_some() => {}
                Ok(Startup::Failed(line)) => {
                    let _ = child.kill();
                    panic!("nats-server refused its configuration: {line}");
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("nats-server did not start listening within 10 s");
                }
            }
        }
        let port = port.expect("client port");
        NatsServer {
            child,
            port,
            route_port,
            monitor_port,
            dir,
        }
    }

    /// The client port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The route (cluster) port on 127.0.0.1, for a node started with
    /// [`NatsServer::start_cluster_node`].
    pub fn route_port(&self) -> Option<u16> {
        self.route_port
    }

    /// The HTTP monitoring port on 127.0.0.1, if the configuration enabled it before the client
    /// port was reported (`http: "127.0.0.1:-1"`).
    pub fn monitor_port(&self) -> Option<u16> {
        self.monitor_port
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
