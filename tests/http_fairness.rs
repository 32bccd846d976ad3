//! Fair sharing over HTTP: a backlog of one client does not hold up another client's requests.
//! In its own test binary so that the process-wide metrics belong to this one server.

mod common;

use std::sync::{Arc, Mutex};

use inferflux::actors::intake::api_key_client;
use serde_json::json;

fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
}

#[tokio::test]
async fn unified_batch_http_late_client_is_served_before_the_backlog() {
    // Each step slowed (the fault hook's delay, whose routes no other assertion here uses), so
    // that A's backlog builds up however fast the machine serves it: without it, a fast run
    // finished A's first requests before the last arrived, and the wait below never ended.
    let server = common::start_slowed(
        |s| {
            s.scheduler.max_running = 2;
            s.scheduler.fairness_half_life_steps = 32;
        },
        2,
    )
    .await;
    let base = server.base.clone();
    // A authenticates with an API key; B names itself with `user`.
    let key_a = "sk-test-alice-0123456789";
    let client_a = api_key_client(key_a);
    assert!(client_a.starts_with("key-") && client_a.len() == 12, "{client_a}");
    let order = Arc::new(Mutex::new(Vec::new()));
    let send = |who: &'static str, i: usize| {
        let (base, order) = (base.clone(), order.clone());
        let mut body = json!({ "prompt": format!("Request {i} from {who}"), "max_tokens": 8, "temperature": 0, "ignore_eos": true });
        let mut req = reqwest::Client::new().post(format!("{base}/v1/completions"));
        if who == "a" {
            req = req.bearer_auth(key_a);
        } else {
            body["user"] = json!("b");
        }
        tokio::spawn(async move {
            let resp = req.json(&body).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            let v: serde_json::Value = resp.json().await.unwrap();
            assert_eq!(v["choices"][0]["finish_reason"], "length");
            order.lock().unwrap().push(who);
        })
    };
    let mut handles: Vec<_> = (0..80).map(|i| send("a", i)).collect();
    let done = |who: &str| order.lock().unwrap().iter().filter(|w| **w == who).count();
    // Wait until A's backlog is queued, or every request of A has arrived (then the backlog
    // assertion below says how small it was).
    loop {
        let q = common::queue_report(&base).await;
        let in_server = (q["waiting"].as_u64().unwrap() + q["running"].as_u64().unwrap()) as usize;
        if in_server >= 75 || in_server + done("a") >= 80 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    handles.extend((0..5).map(|i| send("b", i)));
    // A's completions when the server had all of B's requests: B's connections may take a while
    // to arrive on a loaded machine, and A is rightly served meanwhile, so count from there.
    let mut a_done_when_b_arrived = None;
    let mut jain_while_both = Vec::new();
    while done("b") < 5 {
        let a_done = done("a");
        let q = common::queue_report(&base).await;
        let clients = q["clients"].as_array().unwrap();
        let b_in = clients.iter().find(|c| c["client"] == "b").map_or(0, |c| {
            c["waiting"].as_u64().unwrap() + c["running"].as_u64().unwrap()
        });
        if a_done_when_b_arrived.is_none() && b_in as usize + done("b") >= 5 {
            let a_waiting = clients
                .iter()
                .find(|c| c["client"] == client_a)
                .map_or(0, |c| c["waiting"].as_u64().unwrap());
            a_done_when_b_arrived = Some((a_done, a_waiting));
        }
        let has_work =
            |c: &serde_json::Value| c["waiting"].as_u64().unwrap() + c["running"].as_u64().unwrap() > 0;
        if clients.len() == 2 && clients.iter().all(has_work) {
            jain_while_both.push(q["fairness_index"].as_f64().unwrap());
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    // First come first served would finish the ~75 A requests queued ahead of B first. A fair
    // share gives A about half the steps while B has work: about 5 of A's requests, as many as
    // B's.
    let (a_done_before, a_waiting) = a_done_when_b_arrived.expect("B's requests reached the server");
    let a_done_while_b = done("a") - a_done_before;
    assert!(
        a_waiting >= 30,
        "A's backlog was nearly served before B's requests arrived ({a_waiting} waiting)"
    );
    assert!(
        a_done_while_b <= 15,
        "B's 5 requests were not served before A's backlog: {a_done_while_b} of A's {a_waiting} waiting finished first"
    );
    let metrics = common::metrics_text(&base).await;
    let jain = metric(&metrics, "inferflux_fairness_jain_index").unwrap();
    for h in handles {
        h.await.unwrap();
    }
    // While both had work the index rose toward 1 (B is served as much as A); right after B's
    // last request it still reflects B's recent share (with none it would be 0.5), though how
    // much has decayed depends on how many steps the scrape came after.
    let best = jain_while_both.iter().copied().fold(0.0, f64::max);
    assert!(
        best > 0.8,
        "fairness index while both were active: {jain_while_both:?}"
    );
    assert!(jain > 0.6, "fairness index when B was done: {jain}");
    let served_b = metric(&metrics, "inferflux_client_tokens_served_total{client=\"b\"}").unwrap();
    let served_a = metric(
        &metrics,
        &format!("inferflux_client_tokens_served_total{{client=\"{client_a}\"}}"),
    );
    assert!(served_b >= 5.0 * 8.0, "{served_b}");
    assert!(served_a.unwrap() > 0.0);
    assert!(!metrics.contains(key_a), "the API key never shows in the metrics");
    assert!(metrics.contains("inferflux_client_wait_seconds_count{client=\"b\"} 5"));
    assert!(metrics.contains("inferflux_client_queue_depth{client=\"b\"}"));
}
