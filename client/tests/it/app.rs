//! What an app built on the SDK sees: its events, recorded, and waits on them with a deadline.

use std::time::Duration;

use tokio::time::Instant;
use zhibo_client::proto::client::{Message, RoomMessages};
use zhibo_client::{Event, Events, Options, Session, Transport};

use crate::fixture::Cluster;

pub(crate) const WAIT: Duration = Duration::from_secs(20);

pub(crate) struct App {
    pub(crate) session: Session,
    events: Events,
    pub(crate) messages: Vec<Message>,
    pub(crate) rooms: Vec<RoomMessages>,
    pub(crate) connected: Vec<String>,
    pub(crate) disconnected: Vec<(String, Duration)>,
    pub(crate) synced: usize,
    pub(crate) go_aways: usize,
    pub(crate) rejoined: usize,
    pub(crate) kicked: bool,
    pub(crate) closed: bool,
    pub(crate) ended: bool,
}

impl App {
    pub(crate) async fn start(options: Options) -> App {
        let (session, events) = Session::connect(options).await.expect("first connection");
        App {
            session,
            events,
            messages: Vec::new(),
            rooms: Vec::new(),
            connected: Vec::new(),
            disconnected: Vec::new(),
            synced: 0,
            go_aways: 0,
            rejoined: 0,
            kicked: false,
            closed: false,
            ended: false,
        }
    }

    /// Quick reconnection, for tests.
    pub(crate) fn options(
        t: Transport,
        addr: String,
        creds: &zhibo_client::Credentials,
    ) -> Options {
        let mut o = Options::new(t, addr, creds.clone());
        o.backoff_min = Duration::from_millis(50);
        o.backoff_max = Duration::from_millis(500);
        o.retry_after = Duration::from_millis(200);
        o
    }

    /// Connected to gateway `gw` of `cluster` over `t`, synced.
    pub(crate) async fn on(
        cluster: &Cluster,
        t: Transport,
        gw: usize,
        creds: &zhibo_client::Credentials,
    ) -> App {
        let mut app = App::start(Self::options(t, cluster.gw(gw).of(t), creds)).await;
        app.until("first sync", |a| a.synced >= 1).await;
        app
    }

    fn record(&mut self, event: Option<Event>) {
        match event {
            None => self.ended = true,
            Some(Event::Message(m)) => self.messages.push(m),
            Some(Event::RoomMessages(r)) => self.rooms.push(r),
            Some(Event::Connected { addr, .. }) => self.connected.push(addr),
            Some(Event::Disconnected { reason, retry_in }) => {
                self.disconnected.push((reason, retry_in))
            }
            Some(Event::Synced { .. }) => self.synced += 1,
            Some(Event::GoAway(_)) => self.go_aways += 1,
            Some(Event::RoomRejoined(_)) => self.rejoined += 1,
            Some(Event::Kicked(_)) => self.kicked = true,
            Some(Event::Closed { .. }) => self.closed = true,
            Some(_) => {}
        }
    }

    /// Reads events until `done` holds; panics after [`WAIT`].
    pub(crate) async fn until(&mut self, what: &str, done: impl Fn(&App) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done(self) {
            assert!(!self.ended, "{what}: the session ended first");
            match tokio::time::timeout_at(deadline, self.events.next()).await {
                Ok(e) => self.record(e),
                Err(_) => panic!(
                    "{what}: not within {WAIT:?}; messages {:?}, connected {:?}, disconnected {:?}",
                    self.texts(),
                    self.connected,
                    self.disconnected
                ),
            }
        }
    }

    /// Reads the events already queued, without waiting.
    pub(crate) async fn drain(&mut self) {
        while let Ok(Some(e)) =
            tokio::time::timeout(Duration::from_millis(1), self.events.next()).await
        {
            self.record(Some(e));
        }
    }

    pub(crate) fn texts(&self) -> Vec<String> {
        self.messages
            .iter()
            .map(|m| String::from_utf8_lossy(&m.content).into_owned())
            .collect()
    }

    pub(crate) fn has(&self, text: &str) -> bool {
        self.texts().iter().any(|t| t == text)
    }

    /// Every message exactly once, with distinct seqs.
    pub(crate) fn assert_exactly(&self, expected: &[String]) {
        let mut got = self.texts();
        got.sort();
        let mut want = expected.to_vec();
        want.sort();
        assert_eq!(got, want, "the app's messages");
        let mut seqs: Vec<u64> = self.messages.iter().map(|m| m.seq).collect();
        seqs.sort_unstable();
        seqs.dedup();
        assert_eq!(seqs.len(), self.messages.len(), "distinct seqs");
    }
}
