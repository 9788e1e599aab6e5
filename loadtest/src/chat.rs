//! The terminal chat client: sign up or in, connect over TCP, WebSocket or QUIC, print what was missed,
//! then send lines and print what arrives. Input and output are parameters so tests can script it.

use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use serde_json::json;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};
use zhibo_proto::client::packet::Body;
use zhibo_proto::client::{
    ErrorCode, Heartbeat, MessageAck, Packet, ReceiverType, SendMessageInput, SyncInput,
};

use crate::client::{Client, Transport};
use crate::http::Api;

/// `chat` options.
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

const HELP: &str = "commands: /to <user_id> | /group <group_id> | /friend <user_id> [greeting] | \
/agree <user_id> | /requests | /friends | /sync | /me | /quit; any other line is sent to the current chat";

enum Target {
    None,
    User(i64),
    Group(i64),
}

/// Runs the chat client until `/quit`, end of input, or the server closes the connection.
///
/// # Errors
/// When sign-in or the connection fails.
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
    let (mut client, signed_in) = Client::connect(args.transport, &addr, &creds).await?;
    let say = |s: String| s + "\n";
    out.write_all(
        say(format!(
            "signed in as user {} on device {} over {:?} ({addr}). {HELP}",
            creds.user_id, device_id, args.transport
        ))
        .as_bytes(),
    )
    .await?;
    let mut last_seq = 0u64;
    // Catch up on what was missed, page by page.
    loop {
        let page = client
            .request(
                Body::Sync(SyncInput {
                    seq: last_seq,
                    limit: 100,
                }),
                Duration::from_secs(10),
            )
            .await?;
        let Some(Body::SyncOutput(o)) = page.body else {
            break;
        };
        for m in &o.messages {
            last_seq = last_seq.max(m.seq);
            out.write_all(say(format_message(m)).as_bytes()).await?;
        }
        if !o.has_more {
            break;
        }
    }
    if last_seq > 0 {
        client
            .send(Body::MessageAck(MessageAck { seq: last_seq }))
            .await?;
    }
    out.flush().await?;
    let mut target = Target::None;
    let mut lines = input.lines();
    let mut heartbeat = tokio::time::interval(Duration::from_millis(u64::from(
        signed_in.heartbeat_interval_ms.max(1000),
    )));
    heartbeat.tick().await;
    let mut next_msg = 0u64;
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line? else { break };
                let line = line.trim().to_owned();
                if line.is_empty() {
                    continue;
                }
                let mut words = line.split_whitespace();
                let reply = match (words.next(), words.next()) {
                    (Some("/quit"), _) => break,
                    (Some("/to"), Some(id)) => match id.parse() {
                        Ok(id) => { target = Target::User(id); format!("now chatting with user {id}") }
                        Err(_) => "usage: /to <user_id>".into(),
                    },
                    (Some("/group"), Some(id)) => match id.parse() {
                        Ok(id) => { target = Target::Group(id); format!("now chatting in group {id}") }
                        Err(_) => "usage: /group <group_id>".into(),
                    },
                    (Some("/friend"), Some(id)) => {
                        let greeting: Vec<&str> = words.collect();
                        match id.parse::<i64>() {
                            Ok(id) => match api.post("/v1/friends/requests", Some(&creds.token),
                                json!({"to_user_id": id, "message": greeting.join(" ")})).await {
                                Ok(_) => format!("friend request sent to {id}"),
                                Err(e) => format!("friend request failed: {e}"),
                            },
                            Err(_) => "usage: /friend <user_id> [greeting]".into(),
                        }
                    }
                    (Some("/agree"), Some(id)) => match api
                        .post(&format!("/v1/friends/requests/{id}/agree"), Some(&creds.token), json!({}))
                        .await
                    {
                        Ok(_) => format!("you and {id} are friends"),
                        Err(e) => format!("agree failed: {e}"),
                    },
                    (Some("/requests"), _) => api.get("/v1/friends/requests", &creds.token).await
                        .map_or_else(|e| format!("failed: {e}"), |v| v.to_string()),
                    (Some("/friends"), _) => api.get("/v1/friends", &creds.token).await
                        .map_or_else(|e| format!("failed: {e}"), |v| v.to_string()),
                    (Some("/me"), _) => format!("user {} device {}", creds.user_id, device_id),
                    (Some("/sync"), _) => {
                        client.send(Body::Sync(SyncInput { seq: last_seq, limit: 100 })).await?;
                        continue;
                    }
                    (Some(cmd), _) if cmd.starts_with('/') => HELP.to_owned(),
                    _ => {
                        let (receiver_type, receiver_id) = match target {
                            Target::User(id) => (ReceiverType::User, id),
                            Target::Group(id) => (ReceiverType::Group, id),
                            Target::None => {
                                out.write_all(b"pick a chat first: /to <user_id> or /group <group_id>\n").await?;
                                out.flush().await?;
                                continue;
                            }
                        };
                        next_msg += 1;
                        client.send(Body::SendMessage(SendMessageInput {
                            receiver_type: receiver_type as i32,
                            receiver_id,
                            client_msg_id: format!("cli-{device_id}-{}-{next_msg}", std::process::id()),
                            content_type: 1,
                            content: Bytes::from(line.clone()),
                        })).await?;
                        continue;
                    }
                };
                out.write_all(say(reply).as_bytes()).await?;
            }
            p = client.recv(Duration::from_secs(3600)) => {
                let Some(p) = p? else {
                    out.write_all(b"connection closed by the server\n").await?;
                    break;
                };
                if let Some(text) = describe(&p, &mut last_seq) {
                    out.write_all(say(text).as_bytes()).await?;
                }
            }
            _ = heartbeat.tick() => {
                client.send(Body::Heartbeat(Heartbeat {})).await?;
            }
        }
        out.flush().await?;
    }
    out.flush().await?;
    client.close().await.ok();
    Ok(())
}

fn format_message(m: &zhibo_proto::client::Message) -> String {
    let to = match ReceiverType::try_from(m.receiver_type) {
        Ok(ReceiverType::Group) => format!("group {}", m.receiver_id),
        Ok(ReceiverType::Room) => format!("room {}", m.receiver_id),
        _ => format!("user {}", m.receiver_id),
    };
    format!(
        "[seq {}] {} -> {}: {}",
        m.seq,
        m.sender_user_id,
        to,
        String::from_utf8_lossy(&m.content)
    )
}

fn describe(p: &Packet, last_seq: &mut u64) -> Option<String> {
    match &p.body {
        Some(Body::Message(m)) => {
            *last_seq = (*last_seq).max(m.seq);
            Some(format_message(m))
        }
        Some(Body::SendMessageOutput(o)) => {
            *last_seq = (*last_seq).max(o.seq);
            Some(format!("sent (seq {}, id {})", o.seq, o.message_id))
        }
        Some(Body::SyncOutput(o)) => Some(
            o.messages
                .iter()
                .map(|m| {
                    *last_seq = (*last_seq).max(m.seq);
                    format_message(m)
                })
                .collect::<Vec<_>>()
                .join("\n"),
        )
        .filter(|s| !s.is_empty()),
        Some(Body::Error(e)) => Some(format!(
            "error {:?}: {}",
            ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified),
            e.message
        )),
        Some(Body::Kick(k)) => Some(format!("kicked: {}", k.text)),
        Some(Body::GoAway(g)) => Some(format!(
            "server going away: {} (reconnect to {:?})",
            g.reason, g.reconnect_hint
        )),
        _ => None,
    }
}
