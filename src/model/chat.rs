//! Chat templates: a checkpoint's Jinja template rendered with `minijinja` the way transformers'
//! `apply_chat_template` renders it.
//!
//! transformers uses a sandboxed Jinja2 environment with `trim_blocks`, `lstrip_blocks` and loop
//! controls, the special tokens as variables (`bos_token`, `eos_token`, ...), `raise_exception`,
//! `strftime_now`, and a `tojson` that is Python's `json.dumps` (no HTML escaping, `", "` and
//! `": "` separators). Templates also call Python string methods (`.strip()`, `.split()`), which
//! minijinja-contrib's pycompat provides.

use std::path::Path;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;

use super::ModelError;

const TEMPLATE_NAME: &str = "chat";

/// Instructions one render may run. Real templates use tens per message, and a body within
/// `server.max_body_bytes` holds at most some tens of thousands of messages; a template that
/// loops (nested `range`s) stops here with an error instead of holding a worker. No loader is
/// set, so `include`, `import` and `extends` can reach no file.
pub const CHAT_TEMPLATE_FUEL: u64 = 20_000_000;

/// One message as templates see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// The template failed on these messages (`raise_exception`, a missing role, ...).
#[derive(Debug, thiserror::Error)]
#[error("chat template: {0}")]
pub struct ChatTemplateError(String);

/// A compiled chat template and the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// `bos_token`, `eos_token`, `unk_token`, `pad_token` as strings, when the tokenizer config has them.
    special_tokens: Vec<(&'static str, String)>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("special_tokens", &self.special_tokens)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// The template of a checkpoint: `chat_template.jinja` when present (transformers 5 writes it
    /// there), else `chat_template` in `tokenizer_config.json` (a string, or a list of named
    /// templates of which `default` is used). `None` when the model has no template.
    pub fn from_checkpoint(
        tokenizer_config: Option<&serde_json::Value>,
        jinja_file: Option<&str>,
        origin: &Path,
    ) -> Result<Option<Self>, ModelError> {
        let source = match (jinja_file, tokenizer_config.and_then(|c| c.get("chat_template"))) {
            (Some(text), _) => Some(text.to_string()),
            (None, Some(serde_json::Value::String(text))) => Some(text.clone()),
            (None, Some(serde_json::Value::Array(named))) => {
                let pick = named
                    .iter()
                    .find(|t| t["name"] == "default")
                    .or_else(|| named.first())
                    .and_then(|t| t["template"].as_str());
                pick.map(str::to_string)
            }
            _ => None,
        };
        let Some(source) = source else {
            return Ok(None);
        };
        let special_tokens = ["bos_token", "eos_token", "unk_token", "pad_token"]
            .into_iter()
            .filter_map(|key| {
                let v = tokenizer_config?.get(key)?;
                // A plain string, or an `AddedToken` object with its `content`.
                let text = v.as_str().or_else(|| v.get("content").and_then(|c| c.as_str()))?;
                Some((key, text.to_string()))
            })
            .collect();
        Self::new(source, special_tokens)
            .map(Some)
            .map_err(|e| ModelError::Tokenizer(format!("{}: chat template: {e}", origin.display())))
    }

    /// Compiles `source` as a template (tests build hostile ones this way).
    pub fn new(source: String, special_tokens: Vec<(&'static str, String)>) -> Result<Self, Error> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(CHAT_TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", python_tojson);
        env.add_template_owned(TEMPLATE_NAME, source)?;
        Ok(Self { env, special_tokens })
    }

    /// Renders `messages` as the model's prompt text; with `add_generation_prompt`, the text
    /// ends where the assistant's answer starts.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatTemplateError(e.to_string()))?;
        let mut ctx: Vec<(&str, Value)> = vec![
            ("messages", Value::from_serialize(messages)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
        ];
        ctx.extend(
            self.special_tokens
                .iter()
                .map(|(k, v)| (*k, Value::from(v.as_str()))),
        );
        let ctx: std::collections::BTreeMap<&str, Value> = ctx.into_iter().collect();
        template.render(ctx).map_err(|e| ChatTemplateError(describe(&e)))
    }
}

/// The message a template raised, or minijinja's own description.
fn describe(e: &Error) -> String {
    match e.kind() {
        ErrorKind::InvalidOperation => e.detail().unwrap_or("invalid operation").to_string(),
        _ => e.to_string(),
    }
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the current UTC date and time (Llama 3.1+ templates print the date).
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    strftime(secs, &format)
}

/// The subset of C `strftime` chat templates use, for a UTC unix time.
fn strftime(secs: u64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = (secs / 86_400) as i64;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('B') => out.push_str(name),
            Some('b') => out.push_str(&name[..3]),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('M') => out.push_str(&format!("{m:02}")),
            Some('S') => out.push_str(&format!("{s:02}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`, as transformers' `tojson`:
/// keys in insertion order, `", "` / `": "` separators, no HTML escaping.
fn python_tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_python_json(&value, indent, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn write_python_json(v: &Value, indent: Option<usize>, depth: usize, out: &mut String) -> Result<(), Error> {
    use minijinja::value::ValueKind;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    let (open, close, is_map) = match v.kind() {
        ValueKind::Seq | ValueKind::Iterable => ('[', ']', false),
        ValueKind::Map => ('{', '}', true),
        _ => {
            let scalar = serde_json::to_string(v)
                .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
            out.push_str(&scalar);
            return Ok(());
        }
    };
    out.push(open);
    let mut empty = true;
    for (i, item) in v.try_iter()?.enumerate() {
        empty = false;
        if i > 0 {
            out.push_str(item_sep);
        }
        newline(out, depth + 1);
        if is_map {
            let key = serde_json::to_string(&item.to_string()).unwrap_or_default();
            out.push_str(&key);
            out.push_str(": ");
            write_python_json(&v.get_item(&item)?, indent, depth + 1, out)?;
        } else {
            write_python_json(&item, indent, depth + 1, out)?;
        }
    }
    if !empty {
        newline(out, depth);
    }
    out.push(close);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(source: &str) -> ChatTemplate {
        let config = serde_json::json!({ "chat_template": source, "bos_token": "<s>", "eos_token": {"content": "</s>"} });
        ChatTemplate::from_checkpoint(Some(&config), None, Path::new("t"))
            .unwrap()
            .unwrap()
    }

    fn user(content: &str) -> ChatMessage {
        ChatMessage {
            role: "user".into(),
            content: content.into(),
        }
    }

    #[test]
    fn chat_template_sees_special_tokens_and_python_methods() {
        let t = template("{{ bos_token }}{% for m in messages %}{{ m.content.strip() | upper }}{% endfor %}{{ eos_token }}");
        assert_eq!(t.render(&[user("  hi ")], false).unwrap(), "<s>HI</s>");
    }

    #[test]
    fn chat_template_raise_exception_is_the_error() {
        let t =
            template("{% if messages[0].role != 'system' %}{{ raise_exception('system first') }}{% endif %}");
        let err = t.render(&[user("x")], true).unwrap_err().to_string();
        assert!(err.contains("system first"), "{err}");
    }

    #[test]
    fn chat_template_tojson_is_pythons_json_dumps() {
        let t = template("{{ {'b': [1, 'é<'], 'a': none} | tojson }}|{{ [1] | tojson(indent=2) }}");
        let out = t.render(&[], false).unwrap();
        assert_eq!(out, "{\"b\": [1, \"é<\"], \"a\": null}|[\n  1\n]");
    }

    #[test]
    fn chat_template_strftime_formats_utc_dates() {
        // 2024-07-26 12:34:56 UTC.
        assert_eq!(
            strftime(1_721_997_296, "%d %b %Y %H:%M:%S %B"),
            "26 Jul 2024 12:34:56 July"
        );
        assert_eq!(strftime(0, "%Y-%m-%d %y %%"), "1970-01-01 70 %");
    }
}
