//! `zhibo chat`: the terminal chat client, built on the `zhibo-client` SDK (a [`Session`] that
//! reconnects, resumes, resends and fills gaps by itself). Sign up or in, then send lines and see what
//! arrives, with people addressed by username and readable timestamps. Input and output are parameters
//! so tests can script it.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use zhibo_client::proto::client::{Message, ReceiverType, RoomNotice};
use zhibo_client::{Api, Credentials, Event, Options, Session, Transport};

/// `zhibo chat` options.
#[derive(Debug, Clone, clap::Args)]
pub struct ChatArgs {
    /// user-api base URL.
    #[arg(long, default_value = "http://127.0.0.1:7000")]
    pub api: String,
    /// Gateway address; defaults to 127.0.0.1:7001 (tcp), :7002 (ws) or :7003 (quic).
    #[arg(long)]
    pub gateway: Option<String>,
    /// Transport.
    #[arg(long, value_enum, default_value = "tcp")]
    pub transport: Transport,
    /// Username (signed up on first use).
    #[arg(long)]
    pub username: String,
    /// Password.
    #[arg(long)]
    pub password: String,
    /// Reuse a registered device id instead of registering a new one.
    #[arg(long)]
    pub device_id: Option<i64>,
}

const HELP: &str = "commands: /to @user | /group <group_id> | /join <room_id> | /who | /leave | \
/friend @user [greeting] | /agree @user | /requests | /friends | /me | /quit; any other line is sent to \
the current chat (users may also be given by id)";

#[derive(Clone, Copy)]
enum Target {
    None,
    User(i64),
    Group(i64),
    Room(i64),
}

/// `zhibo chat`: runs [`run`] on the terminal; exit code 1 with the error on failure.
pub fn main(args: ChatArgs) -> std::process::ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("zhibo chat: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let stdin = tokio::io::BufReader::new(tokio::io::stdin());
    match runtime.block_on(run(args, stdin, tokio::io::stdout())) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zhibo chat: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs the chat client until `/quit`, end of input, or the session stops (kicked, signed out).
///
/// # Errors
/// When the sign-in or the first connection fails.
pub async fn run<I, O>(args: ChatArgs, input: I, mut out: O) -> anyhow::Result<()>
where
    I: AsyncBufRead + Unpin,
    O: AsyncWrite + Unpin,
{
    let api = Api::new(&args.api);
    let device_id = match args.device_id {
        Some(d) => d,
        None => api
            .register_device("pc")
            .await
            .context("registering a device")?,
    };
    let creds = api
        .sign_up_and_in(&args.username, &args.password, device_id)
        .await
        .context("signing in")?;
    let addr = args.gateway.clone().unwrap_or_else(|| {
        match args.transport {
            Transport::Tcp => "127.0.0.1:7001",
            Transport::Ws => "127.0.0.1:7002",
            Transport::Quic => "127.0.0.1:7003",
        }
        .to_owned()
    });
    let (session, mut events) =
        Session::connect(Options::new(args.transport, addr.clone(), creds.clone()))
            .await
            .with_context(|| format!("connecting to {addr}"))?;
    let mut chat = Chat {
        api,
        creds,
        session,
        names: HashMap::from([(0, "zhibo".to_owned())]),
        target: Target::None,
        online: HashMap::new(),
    };
    chat.names.insert(chat.creds.user_id, args.username.clone());
    say(
        &mut out,
        &format!(
            "signed in as user {} (@{}) on device {device_id} over {:?} ({addr}). {HELP}",
            chat.creds.user_id, args.username, args.transport
        ),
    )
    .await?;
    // Answers to sends arrive later: their tasks report here.
    let (report_tx, mut reports) = mpsc::unbounded_channel::<String>();
    let mut lines = input.lines();
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line? else { break };
                match chat.command(line.trim(), &report_tx).await {
                    Step::Quit => break,
                    Step::Say(text) => say(&mut out, &text).await?,
                    Step::Quiet => {}
                }
            }
            Some(report) = reports.recv() => say(&mut out, &report).await?,
            event = events.next() => {
                let Some(event) = event else {
                    say(&mut out, "session closed").await?;
                    break;
                };
                if let Some(text) = chat.describe(event).await {
                    say(&mut out, &text).await?;
                }
            }
        }
    }
    chat.session.close();
    out.flush().await?;
    Ok(())
}

async fn say<O: AsyncWrite + Unpin>(out: &mut O, text: &str) -> std::io::Result<()> {
    out.write_all(text.as_bytes()).await?;
    out.write_all(b"\n").await?;
    out.flush().await
}

enum Step {
    Quit,
    Say(String),
    Quiet,
}

struct Chat {
    api: Api,
    creds: Credentials,
    session: Session,
    /// Usernames by user id, learnt on first sight.
    names: HashMap<i64, String>,
    target: Target,
    /// Latest online count of each joined room.
    online: HashMap<i64, u64>,
}

impl Chat {
    /// `@name` (looked up by exact username) or a numeric user id.
    async fn user(&mut self, who: &str) -> Result<i64, String> {
        if let Some(name) = who.strip_prefix('@') {
            return match self.api.user_id_by_username(&self.creds.token, name).await {
                Ok(Some(id)) => {
                    self.names.insert(id, name.to_owned());
                    Ok(id)
                }
                Ok(None) => Err(format!("no user named @{name}")),
                Err(e) => Err(format!("looking up @{name} failed: {e}")),
            };
        }
        who.parse()
            .map_err(|_| format!("{who:?} is neither @username nor a user id"))
    }

    /// `@name` of a user id (asked once from user-api), or the id.
    async fn name(&mut self, user_id: i64) -> String {
        if let Some(n) = self.names.get(&user_id) {
            return format!("@{n}");
        }
        match self
            .api
            .get(&format!("/v1/users/{user_id}"), &self.creds.token)
            .await
        {
            Ok(v) => match v["username"].as_str() {
                Some(n) => {
                    self.names.insert(user_id, n.to_owned());
                    format!("@{n}")
                }
                None => format!("user {user_id}"),
            },
            Err(_) => format!("user {user_id}"),
        }
    }

    async fn command(&mut self, line: &str, reports: &mpsc::UnboundedSender<String>) -> Step {
        if line.is_empty() {
            return Step::Quiet;
        }
        let mut words = line.split_whitespace();
        let token = self.creds.token.clone();
        let text = match (words.next(), words.next()) {
            (Some("/quit"), _) => return Step::Quit,
            (Some("/to"), Some(who)) => match self.user(who).await {
                Ok(id) => {
                    self.target = Target::User(id);
                    format!("now chatting with {}", self.name(id).await)
                }
                Err(e) => e,
            },
            (Some("/group"), Some(id)) => match id.parse() {
                Ok(id) => {
                    self.target = Target::Group(id);
                    format!("now chatting in group {id}")
                }
                Err(_) => "usage: /group <group_id>".into(),
            },
            (Some("/join"), Some(id)) => match id.parse::<i64>() {
                Ok(room) => match self.session.join_room(room).await {
                    Ok(joined) => {
                        self.target = Target::Room(room);
                        self.online.insert(room, joined.online_count);
                        let mut text =
                            format!("joined room {room}: {} online", joined.online_count);
                        for m in &joined.recent {
                            text.push('\n');
                            text.push_str(&self.format_room(room, m).await);
                        }
                        text
                    }
                    Err(e) => format!("join failed: {e}"),
                },
                Err(_) => "usage: /join <room_id>".into(),
            },
            (Some("/who"), _) => match self.target {
                Target::Room(room) => format!(
                    "room {room}: {} online",
                    self.online.get(&room).copied().unwrap_or(0)
                ),
                _ => "join a room first: /join <room_id>".into(),
            },
            (Some("/leave"), _) => match self.target {
                Target::Room(room) => {
                    self.session.leave_room(room);
                    self.online.remove(&room);
                    self.target = Target::None;
                    format!("left room {room}")
                }
                _ => "not in a room".into(),
            },
            (Some("/friend"), Some(who)) => {
                let greeting: Vec<&str> = words.collect();
                match self.user(who).await {
                    Ok(id) => match self
                        .api
                        .post(
                            "/v1/friends/requests",
                            Some(&token),
                            json!({"to_user_id": id, "message": greeting.join(" ")}),
                        )
                        .await
                    {
                        Ok(_) => format!("friend request sent to {}", self.name(id).await),
                        Err(e) => format!("friend request failed: {e}"),
                    },
                    Err(e) => e,
                }
            }
            (Some("/agree"), Some(who)) => match self.user(who).await {
                Ok(id) => match self
                    .api
                    .post(
                        &format!("/v1/friends/requests/{id}/agree"),
                        Some(&token),
                        json!({}),
                    )
                    .await
                {
                    Ok(_) => format!("you and {} are friends", self.name(id).await),
                    Err(e) => format!("agree failed: {e}"),
                },
                Err(e) => e,
            },
            (Some("/requests"), _) => self
                .api
                .get("/v1/friends/requests", &token)
                .await
                .map_or_else(|e| format!("failed: {e}"), |v| v.to_string()),
            (Some("/friends"), _) => self
                .api
                .get("/v1/friends", &token)
                .await
                .map_or_else(|e| format!("failed: {e}"), |v| v.to_string()),
            (Some("/me"), _) => format!(
                "user {} device {}",
                self.creds.user_id, self.creds.device_id
            ),
            (Some(cmd), _) if cmd.starts_with('/') => HELP.to_owned(),
            _ => return self.send(line, reports),
        };
        Step::Say(text)
    }

    /// Sends a line to the current chat; its ACK is reported when it comes (after reconnections too).
    fn send(&mut self, line: &str, reports: &mpsc::UnboundedSender<String>) -> Step {
        let (receiver_type, id) = match self.target {
            Target::User(id) => (ReceiverType::User, id),
            Target::Group(id) => (ReceiverType::Group, id),
            Target::Room(room) => {
                let session = self.session.clone();
                let reports = reports.clone();
                let line = line.to_owned();
                tokio::spawn(async move {
                    if let Err(e) = session.send_room(room, 1, line).await {
                        let _ = reports.send(format!("room send failed: {e}"));
                    }
                });
                return Step::Quiet;
            }
            Target::None => {
                return Step::Say(
                    "pick a chat first: /to @user, /group <group_id> or /join <room_id>".into(),
                )
            }
        };
        let sent = self.session.send(receiver_type, id, 1, line.to_owned());
        let reports = reports.clone();
        tokio::spawn(async move {
            let _ = reports.send(match sent.await {
                Ok(ack) => format!(
                    "[{}] sent (seq {}, id {})",
                    clock(ack.server_time_ms),
                    ack.seq,
                    ack.message_id
                ),
                Err(e) => format!("send failed: {e}"),
            });
        });
        Step::Quiet
    }

    async fn format_message(&mut self, m: &Message) -> String {
        let from = self.name(m.sender_user_id).await;
        let to = match ReceiverType::try_from(m.receiver_type) {
            Ok(ReceiverType::Group) => format!("group {}", m.receiver_id),
            _ => self.name(m.receiver_id).await,
        };
        format!(
            "[{}] {from} -> {to}: {}",
            clock(m.server_time_ms),
            String::from_utf8_lossy(&m.content)
        )
    }

    async fn format_room(&mut self, room: i64, m: &Message) -> String {
        let who = self.name(m.sender_user_id).await;
        let text = match RoomNotice::try_from(m.content_type) {
            Ok(RoomNotice::Join) => format!("{who} joined"),
            Ok(RoomNotice::Leave) => format!("{who} left"),
            Ok(RoomNotice::Closed) => "the room was closed".to_owned(),
            _ => format!("{who}: {}", String::from_utf8_lossy(&m.content)),
        };
        format!("[{}] room {room} {text}", clock(m.server_time_ms))
    }

    async fn describe(&mut self, event: Event) -> Option<String> {
        match event {
            Event::Message(m) => Some(self.format_message(&m).await),
            Event::RoomMessages(r) => {
                let mut lines = Vec::new();
                if r.room_id != 0 && self.online.get(&r.room_id) != Some(&r.online_count) {
                    if self.online.contains_key(&r.room_id) {
                        lines.push(format!("room {}: {} online", r.room_id, r.online_count));
                    }
                    self.online.insert(r.room_id, r.online_count);
                }
                for m in &r.messages {
                    lines.push(self.format_room(r.room_id, m).await);
                }
                Some(lines.join("\n")).filter(|s| !s.is_empty())
            }
            Event::Connected { addr, .. } => Some(format!("connected to {addr}")),
            Event::Disconnected { reason, retry_in } => Some(format!(
                "disconnected ({reason}); reconnecting in {} ms",
                retry_in.as_millis()
            )),
            Event::GoAway(g) => Some(format!(
                "server going away: {} (moving to {:?})",
                g.reason, g.reconnect_hint
            )),
            Event::Kicked(k) => Some(format!("kicked: {}", k.text)),
            Event::ServerError(e) => Some(format!("server error {}: {}", e.code, e.message)),
            Event::RoomLost { room_id, error } => Some(format!("lost room {room_id}: {error}")),
            Event::Closed { error } => Some(format!("session closed: {error}")),
            _ => None,
        }
    }
}

/// `HH:MM:SS` (UTC) of a server time in milliseconds since the epoch.
fn clock(ms: i64) -> String {
    let secs = ms.div_euclid(1000).rem_euclid(86_400);
    let t = Duration::from_secs(secs as u64).as_secs();
    format!("{:02}:{:02}:{:02}", t / 3600, t / 60 % 60, t % 60)
}

#[cfg(test)]
mod tests {
    #[test]
    fn clock_is_readable() {
        assert_eq!(super::clock(0), "00:00:00");
        assert_eq!(super::clock(1_700_000_000_123), "22:13:20");
    }
}
