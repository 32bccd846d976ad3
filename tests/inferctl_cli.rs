//! The `inferctl` binary against a real server (and against tiny local listeners where the server
//! cannot show what the client sent): text, chat turns, tokens, dumps and replays, headers, and
//! the exit codes scripts rely on.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::{mpsc, OnceLock};

use common::{start, TestServer};
use serde_json::{json, Value};

fn embedded() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| start(|_| {}))
}

/// A server for the chat tests: the embedded model has no chat template.
fn chat_server() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-qwen2");
        start(move |s| s.model.path = Some(dir))
    })
}

/// Runs `inferctl ARGS` with `stdin` piped in, without the caller's `INFERFLUX_*` variables.
fn inferctl(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_inferctl"))
        .args(args)
        .env_remove("INFERFLUX_URL")
        .env_remove("INFERFLUX_API_KEY")
        .env_remove("INFERFLUX_ADMIN_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}; stderr: {}",
        out.status.code(),
        stderr(out)
    );
}

fn temp_file(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("inferctl-{}-{name}", std::process::id()))
}

/// A listener that answers every request with `response` (a whole HTTP response) and hands each
/// request's head and body to the returned channel.
fn fake_server(response: &'static str) -> (String, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")?
                        .trim()
                        .parse()
                        .ok()
                })
                .unwrap_or(0);
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let _ = tx.send(head + "\r\n" + &String::from_utf8_lossy(&body));
            let _ = stream.write_all(response.as_bytes());
        }
    });
    (format!("http://{addr}"), rx)
}

fn http_response(status: &str, content_type: &str, body: &str) -> &'static str {
    Box::leak(
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_boxed_str(),
    )
}

/// The value of the `authorization` header in a request head, if any.
fn authorization(head: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("authorization")
            .then(|| value.trim().to_string())
    })
}

#[test]
fn inferctl_completion_streams_and_replay_prints_the_same_text() {
    let base = &embedded().base;
    let p = &common::goldens().prompts[0];
    let dump = temp_file("completion.sse");
    let dump_arg = dump.to_str().unwrap();
    let args = [
        "--url",
        base,
        "completion",
        &p.prompt,
        "--max-tokens",
        "24",
        "--temperature",
        "0",
    ];
    let whole = inferctl(&args, "");
    assert_ok(&whole);
    assert_eq!(stdout(&whole), format!("{}\n", p.greedy_text));
    assert!(
        stderr(&whole).contains("finish_reason=\"length\""),
        "{}",
        stderr(&whole)
    );

    let streamed = inferctl(&[&args[..], &["--dump-sse", dump_arg]].concat(), "");
    assert_ok(&streamed);
    assert_eq!(stdout(&streamed), format!("{}\n", p.greedy_text));
    assert!(
        stderr(&streamed).is_empty(),
        "no spinner when stderr is not a terminal: {:?}",
        stderr(&streamed)
    );
    let sse = std::fs::read_to_string(&dump).unwrap();
    assert!(sse.starts_with("data: {"), "{sse}");
    assert!(sse.ends_with("data: [DONE]\n\n"), "{sse}");

    let replayed = inferctl(&["replay", dump_arg], "");
    assert_ok(&replayed);
    assert_eq!(
        stdout(&replayed),
        stdout(&streamed),
        "replay prints what streamed"
    );
    assert_eq!(stderr(&replayed), "finish_reason=length\n");
    let _ = std::fs::remove_file(dump);
}

/// The dump holds the bytes exactly as they came, whatever their framing (no space after `data:`,
/// CRLF line ends, comments), and replay parses them all the same.
#[test]
fn inferctl_dump_sse_keeps_the_raw_bytes() {
    let body = ": keep-alive\r\n\r\ndata:{\"choices\":[{\"index\":0,\"text\":\"Hel\",\"finish_reason\":null}]}\r\n\r\n\
                data: {\"choices\":[{\"index\":0,\"text\":\"lo\",\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";
    let (url, _) = fake_server(http_response("200 OK", "text/event-stream", body));
    let dump = temp_file("raw.sse");
    let dump_arg = dump.to_str().unwrap();
    let out = inferctl(&["--url", &url, "completion", "x", "--dump-sse", dump_arg], "");
    assert_ok(&out);
    assert_eq!(stdout(&out), "Hello\n");
    assert_eq!(std::fs::read_to_string(&dump).unwrap(), body, "byte for byte");
    let replayed = inferctl(&["replay", dump_arg], "");
    assert_ok(&replayed);
    assert_eq!(stdout(&replayed), "Hello\n");
    assert_eq!(stderr(&replayed), "finish_reason=stop\n");
    let _ = std::fs::remove_file(dump);
}

#[test]
fn inferctl_replay_picks_a_choice_and_reports_error_events() {
    let dump = temp_file("choices.sse");
    let chunk = |index: u32, content: &str, finish: Value| {
        let v = json!({ "object": "chat.completion.chunk",
                        "choices": [{ "index": index, "delta": { "content": content }, "finish_reason": finish }] });
        format!("data: {v}\n\n")
    };
    let two = [
        chunk(0, "a", Value::Null),
        chunk(1, "B", Value::Null),
        chunk(0, "b", json!("stop")),
        chunk(1, "C", json!("length")),
        "data: [DONE]\n\n".into(),
    ]
    .concat();
    std::fs::write(&dump, &two).unwrap();
    let first = inferctl(&["replay", dump.to_str().unwrap()], "");
    assert_ok(&first);
    assert_eq!(
        (stdout(&first), stderr(&first)),
        ("ab\n".into(), "finish_reason=stop\n".into())
    );
    let second = inferctl(&["replay", dump.to_str().unwrap(), "--choice", "1"], "");
    assert_ok(&second);
    assert_eq!(
        (stdout(&second), stderr(&second)),
        ("BC\n".into(), "finish_reason=length\n".into())
    );

    let error = r#"data: {"error":{"message":"the model step failed","type":"server_error","param":null,"code":null}}"#;
    std::fs::write(
        &dump,
        format!("{}{error}\n\ndata: [DONE]\n\n", chunk(0, "a", Value::Null)),
    )
    .unwrap();
    let failed = inferctl(&["replay", dump.to_str().unwrap()], "");
    assert_eq!(failed.status.code(), Some(5), "{}", stderr(&failed));
    assert_eq!(stdout(&failed), "a\n", "the text before the error is printed");
    assert!(
        stderr(&failed).contains("the model step failed"),
        "{}",
        stderr(&failed)
    );
    let _ = std::fs::remove_file(dump);
}

/// What the server answers a non-streamed, greedy chat of `messages`.
async fn chat_reply(base: &str, messages: &Value) -> String {
    let v: Value = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({ "messages": messages, "max_tokens": 8, "temperature": 0 }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"))
        .to_string()
}

#[tokio::test]
async fn inferctl_chat_turns_from_stdin_keep_history() {
    let base = &chat_server().base;
    let system = json!({ "role": "system", "content": "Be brief." });
    let hello = json!({ "role": "user", "content": "hello" });
    let reply1 = chat_reply(base, &json!([system, hello])).await;
    let how = json!({ "role": "user", "content": "how are you?" });
    let reply2 = chat_reply(
        base,
        &json!([system, hello, { "role": "assistant", "content": reply1 }, how]),
    )
    .await;
    assert_ne!(reply1, reply2, "the history changes the second answer");

    let dump = temp_file("chat.sse");
    let dump_arg = dump.to_str().unwrap();
    let args = [
        "--url",
        base,
        "chat",
        "--system",
        "Be brief.",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--dump-sse",
        dump_arg,
    ];
    // /reset forgets the first exchange but keeps the system message.
    let out = inferctl(&args, "hello\nhow are you?\n\n/reset\nhello\n");
    assert_ok(&out);
    let expected = format!("{reply1}\n{reply2}\n{reply1}\n");
    assert_eq!(stdout(&out), expected);

    let replayed = inferctl(&["replay", dump_arg], "");
    assert_ok(&replayed);
    assert_eq!(stdout(&replayed), expected, "every turn is in the dump");
    assert_eq!(stderr(&replayed).matches("finish_reason=length").count(), 3);

    let one = inferctl(
        &[
            "--url",
            base,
            "chat",
            "--system",
            "Be brief.",
            "--message",
            "hello",
            "--max-tokens",
            "8",
            "--temperature",
            "0",
        ],
        "ignored\n",
    );
    assert_ok(&one);
    assert_eq!(
        stdout(&one),
        format!("{reply1}\n"),
        "--message is one turn; stdin is not read"
    );

    let stopped = inferctl(&["--url", base, "chat", "--max-tokens", "8"], "/exit\nhello\n");
    assert_ok(&stopped);
    assert_eq!(
        stdout(&stopped),
        "",
        "/exit ends the session before the next line"
    );
    let _ = std::fs::remove_file(dump);
}

#[test]
fn inferctl_tokenize_and_detokenize() {
    let base = &embedded().base;
    let p = &common::goldens().prompts[0];
    let ids = |ids: &[u32]| ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" ");

    let out = inferctl(&["--url", base, "tokenize", &p.prompt], "");
    assert_ok(&out);
    assert_eq!(stdout(&out), format!("{}\n", ids(&p.input_ids)));
    assert_eq!(stderr(&out), format!("count: {}\n", p.input_ids.len()));

    let plain = common::tokenizer().encode(p.prompt.as_str(), false).unwrap();
    let out = inferctl(&["--url", base, "tokenize", &p.prompt, "--no-special"], "");
    assert_ok(&out);
    assert_eq!(stdout(&out), format!("{}\n", ids(plain.get_ids())));

    let out = inferctl(&["--url", base, "tokenize", &p.prompt, "--json"], "");
    assert_ok(&out);
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["tokens"], json!(p.input_ids));
    assert_eq!(v["count"], p.input_ids.len());

    let id_args: Vec<String> = plain.get_ids().iter().map(u32::to_string).collect();
    let mut args = vec!["--url", base.as_str(), "detokenize"];
    args.extend(id_args.iter().map(String::as_str));
    let out = inferctl(&args, "");
    assert_ok(&out);
    assert_eq!(stdout(&out), format!("{}\n", p.prompt));
}

#[test]
fn inferctl_exit_codes() {
    let base = &embedded().base;
    let refused = inferctl(&["--url", base, "completion", "hi", "--model", "nope"], "");
    assert_eq!(refused.status.code(), Some(4), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("The model `nope` does not exist."),
        "{}",
        stderr(&refused)
    );
    let refused = inferctl(&["--url", base, "detokenize", "4000000000"], "");
    assert_eq!(refused.status.code(), Some(4), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("tokens"), "{}", stderr(&refused));

    // A port that was just free: nobody listens there.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    for args in [vec!["completion", "hi"], vec!["models"], vec!["admin", "queue"]] {
        let out = inferctl(&[&["--url", url.as_str()][..], &args].concat(), "");
        assert_eq!(out.status.code(), Some(3), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("cannot connect"), "{}", stderr(&out));
    }

    let usage = inferctl(&["completion"], "");
    assert_eq!(usage.status.code(), Some(2), "clap's usage error");
    let missing = inferctl(&["replay", "/nonexistent/inferctl.sse"], "");
    assert_eq!(missing.status.code(), Some(1), "{}", stderr(&missing));

    let (url, _) = fake_server(http_response(
        "500 Internal Server Error",
        "application/json",
        r#"{"error":{"message":"intake unreachable","type":"server_error","param":null,"code":null}}"#,
    ));
    let failed = inferctl(&["--url", &url, "completion", "hi"], "");
    assert_eq!(failed.status.code(), Some(5), "{}", stderr(&failed));
    assert!(
        stderr(&failed).contains("intake unreachable"),
        "{}",
        stderr(&failed)
    );

    let mid_stream = "data: {\"choices\":[{\"index\":0,\"text\":\"He\",\"finish_reason\":null}]}\n\n\
        data: {\"error\":{\"message\":\"the model step failed\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n\
        data: [DONE]\n\n";
    let (url, _) = fake_server(http_response("200 OK", "text/event-stream", mid_stream));
    let failed = inferctl(&["--url", &url, "completion", "hi", "--stream"], "");
    assert_eq!(failed.status.code(), Some(5), "{}", stderr(&failed));
    assert_eq!(stdout(&failed), "He\n");
    assert!(
        stderr(&failed).contains("the model step failed"),
        "{}",
        stderr(&failed)
    );

    let help = inferctl(&["--help"], "");
    assert_ok(&help);
    for line in ["3  cannot connect", "4  the server refused", "5  server error"] {
        assert!(stdout(&help).contains(line), "--help documents exit codes");
    }
}

#[test]
fn inferctl_sends_the_api_key_and_the_admin_token() {
    let (url, heads) = fake_server(http_response(
        "200 OK",
        "application/json",
        r#"{"object":"list","data":[]}"#,
    ));
    let run = |args: &[&str], env: Option<(&str, &str)>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_inferctl"));
        cmd.args(["--url", &url])
            .args(args)
            .env_remove("INFERFLUX_API_KEY")
            .env_remove("INFERFLUX_ADMIN_TOKEN");
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert_ok(&out);
        authorization(&heads.recv().unwrap())
    };
    assert_eq!(run(&["models"], None), None, "no key, no header");
    assert_eq!(
        run(&["--api-key", "sk-one", "models"], None),
        Some("Bearer sk-one".into())
    );
    assert_eq!(
        run(&["models"], Some(("INFERFLUX_API_KEY", "sk-env"))),
        Some("Bearer sk-env".into())
    );
    assert_eq!(
        run(
            &[
                "--api-key",
                "sk-one",
                "--admin-token",
                "adm",
                "admin",
                "queue",
                "--json"
            ],
            None
        ),
        Some("Bearer adm".into()),
        "admin commands send the admin token instead of the key"
    );
    assert_eq!(
        run(
            &["admin", "queue", "--json"],
            Some(("INFERFLUX_ADMIN_TOKEN", "adm-env"))
        ),
        Some("Bearer adm-env".into())
    );
    assert_eq!(
        run(&["--api-key", "sk-one", "admin", "queue", "--json"], None),
        None,
        "the API key is never sent to admin routes"
    );
}
