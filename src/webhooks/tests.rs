//! The engine whole — tasks, schedule, ledger and feed — against receivers
//! on loopback, with the in-memory ledger and feed and the timing shrunk
//! to milliseconds.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::test_receiver::{Answer, Receiver, Request};
use super::*;
use crate::config::{ReceiverUrl, SigningSecrets, Start};
use crate::domain::{EventType, WebhookState};

const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

/// Long enough for any step here on a busy machine.
const PATIENCE: Duration = Duration::from_secs(20);

fn settings() -> DeliverySettings {
    DeliverySettings {
        timeout: Duration::from_secs(2),
        backoff: Backoff {
            first: Duration::from_millis(10),
            max: Duration::from_millis(50),
        },
        ca_file: None,
        // Renewed every 100 ms, so only a stall of almost 2 s on a busy
        // machine could cost a lease (and resend the event in flight).
        lease_ttl: Duration::from_secs(2),
        check_every: Duration::from_millis(100),
        // Small pages, so that paging is part of every test.
        batch: 3,
    }
}

fn webhook(id: &str, url: ReceiverUrl) -> Webhook {
    Webhook {
        id: id.to_string(),
        url,
        secrets: SigningSecrets::parse(SECRET).unwrap(),
        events: None,
        providers: None,
        start: Start::Beginning,
    }
}

fn record(feed: &MemoryFeed, count: usize) {
    for i in 0..count {
        feed.record(EventType::Linked, &format!("u-{i}"), "okta");
    }
}

fn ids(requests: &[Request]) -> Vec<String> {
    requests
        .iter()
        .map(|r| r.header("webhook-id").unwrap_or("").to_string())
        .collect()
}

fn evts(seqs: impl IntoIterator<Item = i64>) -> Vec<String> {
    seqs.into_iter().map(|s| format!("evt_{s}")).collect()
}

fn start(hooks: Vec<Webhook>, ledger: &Arc<MemoryLedger>, feed: &Arc<MemoryFeed>) -> Engine {
    Engine::start(hooks, settings(), ledger.clone(), feed.clone()).unwrap()
}

/// Waits until the ledger's standing for `id` satisfies `done`.
async fn standing_until(
    ledger: &MemoryLedger,
    id: &str,
    done: impl Fn(&crate::domain::WebhookStanding) -> bool,
) -> crate::domain::WebhookStanding {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(standing) = ledger.get(id) {
            if done(&standing) {
                return standing;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} stands at {:?}",
            ledger.get(id)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn every_event_reaches_the_receiver_once_in_seq_order() {
    let receiver = Receiver::start(|_| Answer::status(200)).await;
    let (ledger, feed) = (Arc::new(MemoryLedger::new()), Arc::new(MemoryFeed::new()));
    record(&feed, 4);
    let engine = start(vec![webhook("crm", receiver.url())], &ledger, &feed);

    record(&feed, 3);
    let requests = receiver.wait_for(7, PATIENCE).await;
    let standing = standing_until(&ledger, "crm", |s| s.delivered_seq == 7).await;
    engine.stop().await;

    assert_eq!(ids(&requests), evts(1..=7));
    let bodies: Vec<Vec<u8>> = requests.iter().map(|r| r.body.clone()).collect();
    let expected: Vec<Vec<u8>> = feed
        .events()
        .iter()
        .map(|e| Message::new(e).unwrap().body().to_vec())
        .collect();
    assert_eq!(bodies, expected);
    assert_eq!(standing.state, WebhookState::Active);
    assert_eq!(standing.last_status, Some(200));
}

#[tokio::test]
async fn a_failing_event_is_retried_with_the_same_id_and_nothing_overtakes_it() {
    // evt_2 fails twice (500, then a redirect), then is taken.
    let refusals = Arc::new(AtomicUsize::new(0));
    let seen = refusals.clone();
    let receiver = Receiver::start(move |request| {
        if request.header("webhook-id") == Some("evt_2") {
            match seen.fetch_add(1, Ordering::SeqCst) {
                0 => return Answer::status(500).body("try later"),
                1 => return Answer::status(302).header("location", "http://elsewhere/"),
                _ => {}
            }
        }
        Answer::status(200)
    })
    .await;
    let (ledger, feed) = (Arc::new(MemoryLedger::new()), Arc::new(MemoryFeed::new()));
    record(&feed, 4);

    let engine = start(vec![webhook("crm", receiver.url())], &ledger, &feed);
    let requests = receiver.wait_for(6, PATIENCE).await;
    let standing = standing_until(&ledger, "crm", |s| s.delivered_seq == 4).await;
    engine.stop().await;

    assert_eq!(ids(&requests), evts([1, 2, 2, 2, 3, 4]));
    let retries: Vec<&Request> = requests[1..4].iter().collect();
    assert!(
        retries.iter().all(|r| r.body == retries[0].body),
        "the same body on every retry"
    );
    for retry in retries {
        let timestamp: i64 = retry.header("webhook-timestamp").unwrap().parse().unwrap();
        assert_eq!(
            retry.header("webhook-signature").unwrap(),
            sign(
                SigningSecrets::parse(SECRET)
                    .unwrap()
                    .iter()
                    .next()
                    .unwrap()
                    .expose(),
                "evt_2",
                timestamp,
                &retry.body
            ),
            "each attempt signed with its own timestamp"
        );
    }
    assert_eq!(standing.attempts, 0);
    assert_eq!(standing.state, WebhookState::Active);
}

#[tokio::test]
async fn a_failure_leaves_the_webhook_retrying_with_the_answer_named() {
    let receiver = Receiver::start(|_| Answer::status(503).body("maintenance")).await;
    let (ledger, feed) = (Arc::new(MemoryLedger::new()), Arc::new(MemoryFeed::new()));
    record(&feed, 2);

    let engine = start(vec![webhook("crm", receiver.url())], &ledger, &feed);
    let standing = standing_until(&ledger, "crm", |s| s.attempts >= 3).await;
    engine.stop().await;

    assert_eq!(standing.state, WebhookState::Retrying);
    assert_eq!(standing.delivered_seq, 0);
    assert_eq!(standing.last_status, Some(503));
    assert_eq!(
        standing.last_error.as_deref(),
        Some("answered 503 Service Unavailable: maintenance")
    );
    assert!(standing.next_attempt_at.is_some());
    assert!(ids(&receiver.requests()).iter().all(|id| id == "evt_1"));
}

#[tokio::test]
async fn a_receiver_down_for_a_while_gets_every_event_afterwards_in_order() {
    let down = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let url = crate::config::WebhookUrl::new(format!("http://{down}/hook"))
        .parse()
        .unwrap();
    let (ledger, feed) = (Arc::new(MemoryLedger::new()), Arc::new(MemoryFeed::new()));
    record(&feed, 3);
    let engine = start(vec![webhook("crm", url)], &ledger, &feed);
    let refused = standing_until(&ledger, "crm", |s| s.attempts >= 2).await;

    // The receiver comes up on that port.
    let listener = tokio::net::TcpListener::bind(down).await.unwrap();
    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = accepted.clone();
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buffer = vec![0; 64 * 1024];
            let read = stream.read(&mut buffer).await.unwrap_or(0);
            let head = String::from_utf8_lossy(&buffer[..read]).to_string();
            if let Some(id) = head.lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("webhook-id: ")
                    .map(str::to_string)
            }) {
                seen.lock().unwrap().push(id);
            }
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await;
        }
    });
    standing_until(&ledger, "crm", |s| s.delivered_seq == 3).await;
    engine.stop().await;
    server.abort();

    assert_eq!(refused.state, WebhookState::Retrying);
    assert_eq!(refused.last_status, None);
    assert!(refused.last_error.is_some());
    assert_eq!(*accepted.lock().unwrap(), evts(1..=3));
}

#[tokio::test]
async fn a_410_disables_the_webhook_and_enable_resumes_with_the_refused_event() {
    let gone_once = Arc::new(AtomicBool::new(true));
    let first = gone_once.clone();
    let receiver = Receiver::start(move |request| {
        if request.header("webhook-id") == Some("evt_2") && first.swap(false, Ordering::SeqCst) {
            return Answer::status(410);
        }
        Answer::status(200)
    })
    .await;
    let (ledger, feed) = (Arc::new(MemoryLedger::new()), Arc::new(MemoryFeed::new()));
    record(&feed, 3);
    let engine = start(vec![webhook("crm", receiver.url())], &ledger, &feed);

    let disabled = standing_until(&ledger, "crm", |s| s.state == WebhookState::Disabled).await;
    tokio::time::sleep(settings().check_every * 5).await;
    let while_disabled = receiver.requests().len();
    ledger.enable("crm").await.unwrap();
    standing_until(&ledger, "crm", |s| s.delivered_seq == 3).await;
    engine.stop().await;

    assert_eq!(disabled.delivered_seq, 1);
    assert_eq!(disabled.last_status, Some(410));
    assert_eq!(while_disabled, 2, "nothing is sent while disabled");
    assert_eq!(ids(&receiver.requests()), evts([1, 2, 2, 3]));
}

#[tokio::test]
async fn an_event_pruned_before_delivery_expires_the_webhook_until_a_replay() {
    let accepting = Arc::new(AtomicBool::new(false));
    let open = accepting.clone();
    let receiver = Receiver::start(move |_| {
        if open.load(Ordering::SeqCst) {
            Answer::status(200)
        } else {
            Answer::status(500)
        }
    })
    .await;
    let (ledger, feed) = (Arc::new(MemoryLedger::new()), Arc::new(MemoryFeed::new()));
    record(&feed, 4);
    let engine = start(vec![webhook("crm", receiver.url())], &ledger, &feed);
    standing_until(&ledger, "crm", |s| s.attempts >= 1).await;

    feed.prune_through(2);
    let expired = standing_until(&ledger, "crm", |s| s.state == WebhookState::Expired).await;
    accepting.store(true, Ordering::SeqCst);
    ledger.replay("crm", 2).await.unwrap();
    standing_until(&ledger, "crm", |s| s.delivered_seq == 4).await;
    engine.stop().await;

    assert_eq!(expired.delivered_seq, 0);
    assert!(expired
        .last_error
        .unwrap()
        .contains("linkid webhooks replay crm --after 2"),);
    let delivered: Vec<String> = receiver
        .requests()
        .iter()
        .filter(|r| r.header("webhook-id") != Some("evt_1"))
        .map(|r| r.header("webhook-id").unwrap().to_string())
        .collect();
    assert_eq!(delivered, evts([3, 4]));
}

#[tokio::test]
async fn the_filters_pass_over_other_events_and_count_them_as_passed() {
    let receiver = Receiver::start(|_| Answer::status(204)).await;
    let (ledger, feed) = (Arc::new(MemoryLedger::new()), Arc::new(MemoryFeed::new()));
    let mut hook = webhook("sessions", receiver.url());
    hook.events = Some(vec![EventType::Unlinked]);
    hook.providers = Some(vec!["okta".into()]);
    for (event_type, provider) in [
        (EventType::Linked, "okta"),
        (EventType::Unlinked, "azure-ad"),
        (EventType::Unlinked, "okta"),
        (EventType::Updated, "okta"),
        (EventType::Linked, "okta"),
        (EventType::Unlinked, "okta"),
        (EventType::Linked, "okta"),
        (EventType::Linked, "okta"),
    ] {
        feed.record(event_type, "u-1", provider);
    }

    let engine = start(vec![hook], &ledger, &feed);
    let standing = standing_until(&ledger, "sessions", |s| s.delivered_seq == 8).await;
    engine.stop().await;

    assert_eq!(ids(&receiver.requests()), evts([3, 6]));
    assert_eq!(standing.state, WebhookState::Active);
}

#[tokio::test]
async fn a_new_webhook_starts_after_the_newest_event_or_with_the_oldest_kept() {
    let now_receiver = Receiver::start(|_| Answer::status(200)).await;
    let beginning_receiver = Receiver::start(|_| Answer::status(200)).await;
    let (ledger, feed) = (Arc::new(MemoryLedger::new()), Arc::new(MemoryFeed::new()));
    record(&feed, 3);
    feed.prune_through(1);
    let mut now = webhook("from-now", now_receiver.url());
    now.start = Start::Now;
    let beginning = webhook("from-beginning", beginning_receiver.url());

    let engine = start(vec![now, beginning], &ledger, &feed);
    standing_until(&ledger, "from-now", |_| true).await;
    record(&feed, 1);
    standing_until(&ledger, "from-now", |s| s.delivered_seq == 4).await;
    standing_until(&ledger, "from-beginning", |s| s.delivered_seq == 4).await;
    engine.stop().await;

    assert_eq!(ids(&now_receiver.requests()), evts([4]));
    assert_eq!(ids(&beginning_receiver.requests()), evts(2..=4));
}

#[tokio::test]
async fn a_slow_receiver_delays_only_its_own_webhook() {
    let slow = Receiver::start(|_| Answer::Hang).await;
    let fast = Receiver::start(|_| Answer::status(200)).await;
    let (ledger, feed) = (Arc::new(MemoryLedger::new()), Arc::new(MemoryFeed::new()));
    record(&feed, 5);

    let engine = start(
        vec![webhook("slow", slow.url()), webhook("fast", fast.url())],
        &ledger,
        &feed,
    );
    let delivered = tokio::time::timeout(
        settings().timeout,
        standing_until(&ledger, "fast", |s| s.delivered_seq == 5),
    )
    .await;
    engine.stop().await;

    assert!(
        delivered.is_ok(),
        "the fast webhook waited for the slow one"
    );
    assert_eq!(ids(&slow.requests()), evts([1]));
}

#[tokio::test]
async fn a_ledger_that_is_down_for_a_while_delays_delivery_and_loses_nothing() {
    let receiver = Receiver::start(|_| Answer::status(200)).await;
    let (ledger, feed) = (Arc::new(MemoryLedger::new()), Arc::new(MemoryFeed::new()));
    record(&feed, 2);
    let engine = start(vec![webhook("crm", receiver.url())], &ledger, &feed);
    standing_until(&ledger, "crm", |s| s.delivered_seq == 2).await;

    ledger.set_unavailable(true);
    feed.set_unavailable(true);
    record(&feed, 3);
    tokio::time::sleep(settings().lease_ttl * 2).await;
    ledger.set_unavailable(false);
    feed.set_unavailable(false);
    standing_until(&ledger, "crm", |s| s.delivered_seq == 5).await;
    engine.stop().await;

    let ids = ids(&receiver.requests());
    let mut first_seen = ids.clone();
    first_seen.dedup();
    assert_eq!(
        first_seen,
        evts(1..=5),
        "in order, a repeat only of one in flight: {ids:?}"
    );
}

#[tokio::test]
async fn one_of_two_engines_delivers_and_the_other_takes_over_when_it_stops() {
    let receiver = Receiver::start(|_| Answer::status(200)).await;
    let (ledger, feed) = (Arc::new(MemoryLedger::new()), Arc::new(MemoryFeed::new()));
    let first = start(vec![webhook("crm", receiver.url())], &ledger, &feed);
    let second = start(vec![webhook("crm", receiver.url())], &ledger, &feed);
    record(&feed, 6);
    standing_until(&ledger, "crm", |s| s.delivered_seq == 6).await;

    let holder = ledger.lease_holder("crm").unwrap();
    let (holding, waiting) = if holder == first.holder() {
        (first, second)
    } else {
        (second, first)
    };
    let waiting_holder = waiting.holder().to_string();
    holding.stop().await;
    record(&feed, 6);
    standing_until(&ledger, "crm", |s| s.delivered_seq == 12).await;
    let took_over = ledger.lease_holder("crm");
    waiting.stop().await;

    assert_eq!(
        ids(&receiver.requests()),
        evts(1..=12),
        "each once, in order"
    );
    assert_eq!(took_over, Some(waiting_holder));
    assert_eq!(ledger.lease_holder("crm"), None, "released on stop");
}

#[test]
fn a_dead_instance_is_taken_over_when_its_lease_lapses() {
    // The first engine runs on a runtime of its own, which is then shut
    // down under it: its tasks vanish without releasing, as in a crash.
    let ledger = Arc::new(MemoryLedger::new());
    let feed = Arc::new(MemoryFeed::new());
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    };
    let (doomed, survivor) = (runtime(), runtime());
    let receiver = survivor.block_on(Receiver::start(|_| Answer::status(200)));
    let url = receiver.url();

    let dead_engine = doomed.block_on(async {
        let engine = start(vec![webhook("crm", url.clone())], &ledger, &feed);
        record(&feed, 2);
        standing_until(&ledger, "crm", |s| s.delivered_seq == 2).await;
        engine
    });
    let dead = dead_engine.holder().to_string();
    doomed.shutdown_background();
    survivor.block_on(async {
        let engine = start(vec![webhook("crm", url)], &ledger, &feed);
        record(&feed, 2);
        let started = tokio::time::Instant::now();
        standing_until(&ledger, "crm", |s| s.delivered_seq == 4).await;
        let took = started.elapsed();
        let holder = ledger.lease_holder("crm");
        engine.stop().await;

        assert_ne!(holder.as_deref(), Some(dead.as_str()));
        assert!(
            took >= settings().lease_ttl / 2,
            "waited for the dead one's lease to lapse ({took:?})"
        );
        assert_eq!(ids(&receiver.requests()), evts(1..=4));
    });
    // Kept until here: dropping it would have told its tasks to stop.
    drop(dead_engine);
}

#[tokio::test]
async fn metrics_count_attempts_by_webhook_id_and_never_show_the_url() {
    let refuse = Arc::new(AtomicBool::new(true));
    let receiver = Receiver::start(move |_| {
        if refuse.swap(false, Ordering::SeqCst) {
            return Answer::status(500);
        }
        Answer::status(200)
    })
    .await;
    let mut url = receiver.url().expose().clone();
    url.set_username("metrics-user").unwrap();
    url.set_password(Some("pw-7q")).unwrap();
    let url = crate::config::WebhookUrl::new(url.to_string())
        .parse()
        .unwrap();
    let (ledger, feed) = (Arc::new(MemoryLedger::new()), Arc::new(MemoryFeed::new()));
    record(&feed, 2);

    let engine = start(vec![webhook("metrics-hook", url)], &ledger, &feed);
    standing_until(&ledger, "metrics-hook", |s| s.delivered_seq == 2).await;
    engine.stop().await;

    let text = crate::telemetry::prometheus().render();
    assert!(
        text.contains(
            r#"linkid_webhook_deliveries_total{webhook="metrics-hook",outcome="delivered"} 2"#
        ),
        "{text}"
    );
    assert!(
        text.contains(
            r#"linkid_webhook_deliveries_total{webhook="metrics-hook",outcome="rejected"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"linkid_webhook_pending_events{webhook="metrics-hook"} 0"#),
        "{text}"
    );
    assert!(!text.contains("pw-7q") && !text.contains("metrics-user"));
}
