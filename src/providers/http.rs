//! HTTP plumbing shared by the real provider clients: a `reqwest` client with
//! timeouts, and the one place that turns an HTTP outcome into a
//! [`ProviderError`].
//!
//! | outcome | error |
//! |---|---|
//! | connect failure (nothing was sent) | [`ProviderError::Retryable`] |
//! | timeout after sending, connection lost mid-request, broken body | [`ProviderError::OutcomeUnknown`] |
//! | 500, 502, 504 (the server may have acted before failing) | [`ProviderError::OutcomeUnknown`] |
//! | 503, 408, 429 and other 5xx (`Retry-After` → `retry_after_ms`) | [`ProviderError::Retryable`] |
//! | any other 4xx | [`ProviderError::Final`] with the provider's code and message when the body has them, else `http_<status>` |
//! | 2xx whose body is not JSON | [`ProviderError::Protocol`] |
//! | other statuses (1xx, 3xx) | [`ProviderError::Protocol`] |

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::ProviderError;
use super::json::parse_lossless;

/// How long a provider call may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpSettings {
    /// Whole request, from connect to the last body byte.
    pub timeout: Duration,
    /// TCP + TLS connection establishment.
    pub connect_timeout: Duration,
}

impl Default for HttpSettings {
    /// 30 s per request, 10 s to connect.
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl HttpSettings {
    /// Reads an optional request timeout in milliseconds from `var`
    /// (e.g. `DUE_TIMEOUT_MS`); unset keeps the default, unparseable is a
    /// [`ProviderError::Configuration`] error naming the variable.
    pub fn from_env(
        var: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ProviderError> {
        let mut settings = Self::default();
        if let Some(text) = env(var) {
            let ms: u64 = text.trim().parse().map_err(|_| {
                ProviderError::Configuration(format!(
                    "{var}={text:?} is not a whole number of milliseconds"
                ))
            })?;
            if ms == 0 {
                return Err(ProviderError::Configuration(format!(
                    "{var} must be greater than 0"
                )));
            }
            settings.timeout = Duration::from_millis(ms);
            settings.connect_timeout = settings.connect_timeout.min(settings.timeout);
        }
        Ok(settings)
    }
}

/// Builds the client every provider call goes through.
pub fn build_client(settings: &HttpSettings) -> Result<reqwest::Client, ProviderError> {
    reqwest::Client::builder()
        .timeout(settings.timeout)
        .connect_timeout(settings.connect_timeout)
        .user_agent(concat!("treasury-engine/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| ProviderError::Configuration(format!("cannot build HTTP client: {e}")))
}

/// Sends `request` and returns the JSON body of a 2xx answer, parsed with
/// [`parse_lossless`] so amounts stay exact; every other outcome becomes the
/// [`ProviderError`] the module table gives.
pub async fn send_json(request: reqwest::RequestBuilder) -> Result<Value, ProviderError> {
    let response = request.send().await.map_err(|e| transport_error(&e))?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response.bytes().await.map_err(|e| transport_error(&e))?;
    tracing::debug!(status, bytes = body.len(), "provider answered");
    interpret_response(status, retry_after.as_deref(), &body, Utc::now())
}

/// The pure part of [`send_json`]: what an HTTP status, `Retry-After` header
/// and body mean. `now` resolves an HTTP-date `Retry-After`.
pub fn interpret_response(
    status: u16,
    retry_after: Option<&str>,
    body: &[u8],
    now: DateTime<Utc>,
) -> Result<Value, ProviderError> {
    match status {
        200..=299 => parse_lossless(body).map_err(|e| {
            ProviderError::Protocol(format!(
                "HTTP {status} with a body that is not JSON ({e}): {}",
                excerpt(body)
            ))
        }),
        408 | 429 | 500..=599 => {
            let parsed = parse_lossless(body).ok();
            let (code, message) = parsed.as_ref().map(extract_error).unwrap_or_default();
            let detail = message.or(code).unwrap_or_else(|| excerpt(body));
            let reason = format!("HTTP {status}: {detail}");
            if matches!(status, 500 | 502 | 504) {
                return Err(ProviderError::OutcomeUnknown { reason });
            }
            Err(ProviderError::Retryable {
                reason,
                retry_after_ms: retry_after.and_then(|v| parse_retry_after(v, now)),
            })
        }
        400..=499 => {
            let parsed = parse_lossless(body).ok();
            let (code, message) = parsed.as_ref().map(extract_error).unwrap_or_default();
            Err(ProviderError::Final {
                code: code.unwrap_or_else(|| format!("http_{status}")),
                reason: format!(
                    "HTTP {status}: {}",
                    message.unwrap_or_else(|| excerpt(body))
                ),
            })
        }
        _ => Err(ProviderError::Protocol(format!(
            "unexpected HTTP status {status}: {}",
            excerpt(body)
        ))),
    }
}

/// A transport failure (nothing or only part of an answer arrived). A failed
/// connection sent nothing, so it is [`ProviderError::Retryable`]; any later
/// failure (a timeout after the request went out, a connection lost before the
/// whole answer arrived) leaves the outcome unknown. A request that could not
/// even be built (bad URL) is a configuration error.
pub fn transport_error(err: &reqwest::Error) -> ProviderError {
    if err.is_builder() {
        return ProviderError::Configuration(format!("invalid provider request: {err}"));
    }
    if err.is_connect() {
        return ProviderError::Retryable {
            reason: format!("connection failed: {err}"),
            retry_after_ms: None,
        };
    }
    let kind = if err.is_timeout() {
        "timeout"
    } else {
        "transport error"
    };
    ProviderError::OutcomeUnknown {
        reason: format!("{kind}: {err}"),
    }
}

/// `Retry-After` in milliseconds: either delay-seconds (`"120"`) or an
/// HTTP-date (`"Wed, 21 Oct 2015 07:28:00 GMT"`, counted from `now`, never
/// negative). Unreadable values give `None`.
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<u64> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(seconds.saturating_mul(1000));
    }
    let at = DateTime::parse_from_rfc2822(value).ok()?;
    let ms = at
        .with_timezone(&Utc)
        .signed_duration_since(now)
        .num_milliseconds();
    Some(ms.max(0) as u64)
}

/// The provider's error code and message from the usual error body shapes:
/// `{"code", "message"}`, `{"error": "..."}`, `{"error": {...}}`,
/// `{"errors": ["..."]}` / `{"errors": [{...}]}`, plus the `error_code`,
/// `errorCode`, `detail` and `error_description` spellings.
pub fn extract_error(body: &Value) -> (Option<String>, Option<String>) {
    fn text(v: Option<&Value>) -> Option<String> {
        match v? {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }
    let Value::Object(map) = body else {
        return (None, text(Some(body)));
    };
    let mut code = ["code", "error_code", "errorCode"]
        .iter()
        .find_map(|k| text(map.get(*k)));
    let mut message = ["message", "error_description", "detail", "title"]
        .iter()
        .find_map(|k| text(map.get(*k)));
    for nested in [map.get("error"), map.get("errors").and_then(|e| e.get(0))]
        .into_iter()
        .flatten()
    {
        match nested {
            Value::String(s) => {
                if message.is_none() {
                    message = Some(s.clone());
                } else if code.is_none() {
                    code = Some(s.clone());
                }
            }
            Value::Object(_) => {
                let (c, m) = extract_error(nested);
                code = code.or(c);
                message = message.or(m);
            }
            _ => {}
        }
    }
    (code, message)
}

/// At most 200 characters of a body, for error messages.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return "(empty body)".to_owned();
    }
    let mut out: String = text.chars().take(200).collect();
    if text.chars().count() > 200 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2015, 10, 21, 7, 27, 0).unwrap()
    }

    #[test]
    fn success_parses_exactly() {
        let v = interpret_response(200, None, br#"{"amount": 1000.10}"#, now()).unwrap();
        assert_eq!(v, json!({"amount": "1000.10"}));
    }

    #[test]
    fn success_with_garbage_is_protocol() {
        let err = interpret_response(200, None, b"<html>", now()).unwrap_err();
        assert!(matches!(err, ProviderError::Protocol(_)), "{err:?}");
    }

    #[test]
    fn server_errors_and_throttling_are_retryable() {
        for status in [500, 502, 503, 504, 408] {
            let err = interpret_response(status, None, b"", now()).unwrap_err();
            assert!(err.is_retryable(), "{status}: {err:?}");
        }
        for status in [500, 502, 504] {
            let err = interpret_response(status, None, b"", now()).unwrap_err();
            assert!(err.may_have_acted(), "{status} leaves the outcome unknown");
        }
        for status in [503, 408, 429] {
            let err = interpret_response(status, None, b"", now()).unwrap_err();
            assert!(!err.may_have_acted(), "{status} means nothing was done");
        }
        let err = interpret_response(429, Some("7"), b"{}", now()).unwrap_err();
        assert_eq!(
            err,
            ProviderError::Retryable {
                reason: "HTTP 429: {}".to_owned(),
                retry_after_ms: Some(7000)
            }
        );
    }

    #[test]
    fn retry_after_accepts_http_dates() {
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now()),
            Some(60_000)
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now()),
            Some(0)
        );
        assert_eq!(parse_retry_after("soon", now()), None);
    }

    #[test]
    fn client_errors_are_final_with_the_providers_code() {
        let err = interpret_response(
            400,
            None,
            br#"{"code": "insufficient_funds", "message": "balance too low"}"#,
            now(),
        )
        .unwrap_err();
        assert_eq!(
            err,
            ProviderError::Final {
                code: "insufficient_funds".to_owned(),
                reason: "HTTP 400: balance too low".to_owned()
            }
        );
        let err =
            interpret_response(422, None, br#"{"errors": ["quote expired"]}"#, now()).unwrap_err();
        assert_eq!(
            err,
            ProviderError::Final {
                code: "http_422".to_owned(),
                reason: "HTTP 422: quote expired".to_owned()
            }
        );
        let err = interpret_response(403, None, b"forbidden", now()).unwrap_err();
        assert!(matches!(err, ProviderError::Final { ref code, .. } if code == "http_403"));
    }

    #[test]
    fn nested_error_objects_are_read() {
        let (code, message) = extract_error(&json!({"error": {"code": "E42", "message": "nope"}}));
        assert_eq!(code.as_deref(), Some("E42"));
        assert_eq!(message.as_deref(), Some("nope"));
    }

    #[test]
    fn timeout_setting_is_validated() {
        let env = |k: &str| (k == "X_TIMEOUT_MS").then(|| "abc".to_owned());
        let err = HttpSettings::from_env("X_TIMEOUT_MS", &env).unwrap_err();
        assert!(matches!(err, ProviderError::Configuration(ref m) if m.contains("X_TIMEOUT_MS")));
        let env = |k: &str| (k == "X_TIMEOUT_MS").then(|| "250".to_owned());
        let s = HttpSettings::from_env("X_TIMEOUT_MS", &env).unwrap();
        assert_eq!(s.timeout, Duration::from_millis(250));
    }
}
