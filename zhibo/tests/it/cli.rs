//! `zhibo chat` against an embedded node: two users befriend by username and chat, join a room and see
//! who is online, scripted.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream, Lines};
use zhibo::chat::{run, ChatArgs};
use zhibo_loadtest::client::Transport;

use crate::cluster::Cluster;

struct Terminal {
    keys: DuplexStream,
    screen: Lines<BufReader<DuplexStream>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Terminal {
    fn start(cluster: &Cluster, transport: Transport, username: &str) -> Terminal {
        let (keys, input) = tokio::io::duplex(4096);
        let (output, screen) = tokio::io::duplex(64 * 1024);
        let args = ChatArgs {
            api: cluster.api_base.clone(),
            gateway: Some(cluster.gw(0).of(transport)),
            transport,
            username: username.into(),
            password: "a long enough password".into(),
            device_id: None,
        };
        let task = tokio::spawn(run(args, BufReader::new(input), output));
        Terminal {
            keys,
            screen: BufReader::new(screen).lines(),
            task,
        }
    }

    async fn type_line(&mut self, line: &str) {
        self.keys
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("type");
    }

    /// Reads screen lines until one contains `needle`; returns it.
    async fn expect(&mut self, needle: &str) -> String {
        let read = async {
            loop {
                let line = self
                    .screen
                    .next_line()
                    .await
                    .expect("read")
                    .expect("screen open");
                if line.contains(needle) {
                    return line;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), read)
            .await
            .unwrap_or_else(|_| panic!("no line containing {needle:?}"))
    }
}

fn user_id_of(banner: &str) -> i64 {
    banner
        .split_whitespace()
        .nth(4)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("user id in {banner:?}"))
}

/// `[HH:MM:SS] ...`
fn is_clock(line: &str) -> bool {
    let b = line.as_bytes();
    b.len() > 10
        && b[0] == b'['
        && b[3] == b':'
        && b[6] == b':'
        && b[9] == b']'
        && [1, 2, 4, 5, 7, 8].iter().all(|&i| b[i].is_ascii_digit())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_terminals_chat() {
    let cluster = Cluster::embedded().await;
    let suffix = std::process::id();
    let mut alice = Terminal::start(&cluster, Transport::Tcp, &format!("alice{suffix}"));
    let mut bob = Terminal::start(&cluster, Transport::Quic, &format!("bob{suffix}"));
    let alice_id = user_id_of(&alice.expect("signed in as user").await);
    bob.expect("signed in as user").await;

    alice.type_line("hello?").await;
    alice.expect("pick a chat first").await;
    alice.type_line("/to @nobody-by-that-name").await;
    alice.expect("no user named @nobody-by-that-name").await;
    alice
        .type_line(&format!("/friend @bob{suffix} hi it's alice"))
        .await;
    alice.expect("friend request sent to @bob").await;
    bob.type_line(&format!("/agree @alice{suffix}")).await;
    bob.expect("are friends").await;
    alice.type_line(&format!("/to @bob{suffix}")).await;
    alice.expect("now chatting with @bob").await;
    alice.type_line("hello from the terminal").await;
    let sent = alice.expect("sent (seq").await;
    assert!(is_clock(&sent), "a readable timestamp: {sent}");
    let got = bob.expect("hello from the terminal").await;
    assert!(
        got.contains(&format!("@alice{suffix} -> @bob{suffix}")),
        "{got}"
    );
    assert!(is_clock(&got), "a readable timestamp: {got}");
    bob.type_line(&format!("/to {alice_id}")).await;
    bob.type_line("hi alice").await;
    alice.expect("hi alice").await;

    // A live room: who is online, and what is said there.
    let room = 7_000_000 + i64::from(suffix % 1_000_000);
    alice.type_line(&format!("/join {room}")).await;
    alice.expect(&format!("joined room {room}")).await;
    bob.type_line(&format!("/join {room}")).await;
    let joined = bob.expect(&format!("joined room {room}")).await;
    assert!(joined.ends_with("2 online"), "{joined}");
    alice.expect(&format!("room {room}: 2 online")).await;
    bob.type_line("/who").await;
    bob.expect(&format!("room {room}: 2 online")).await;
    bob.type_line("hi room").await;
    alice
        .expect(&format!("room {room} @bob{suffix}: hi room"))
        .await;
    bob.type_line("/leave").await;
    bob.expect(&format!("left room {room}")).await;
    bob.type_line("/quit").await;
    bob.task
        .await
        .expect("task")
        .expect("bob's client exits cleanly");

    // Bob comes back in a new terminal over WebSocket with the same username: history is synced.
    let mut bob_again = Terminal::start(&cluster, Transport::Ws, &format!("bob{suffix}"));
    bob_again.expect("signed in as user").await;
    bob_again.expect("hello from the terminal").await;
    bob_again.expect("hi alice").await;
    drop(alice);
    cluster.stop().await;
}
