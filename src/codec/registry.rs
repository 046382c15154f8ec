//! A small Confluent Schema Registry client: the three calls the engine
//! makes (a schema by id; register a schema under a subject; look a schema
//! up under a subject), with basic auth and TLS set like Confluent's clients
//! (`basic.auth.user.info`, `ssl.ca.location`, `ssl.certificate.location`,
//! `ssl.key.location`).
//!
//! Its errors say whose fault a failure is: [`CodecError::UnknownSchemaId`]
//! when the registry does not know an id (the message is bad), and
//! [`CodecError::RegistryUnavailable`] when the registry could not answer
//! (down, overloaded, refusing our credentials): retry, never dead-letter.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::StatusCode;

use super::CodecError;

/// How a record's subject is named (Confluent's `subject.name.strategy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub enum SubjectNameStrategy {
    /// `<topic>-value` (the Confluent default).
    #[default]
    TopicNameStrategy,
    /// The record's full name, e.g. `treasury.ConversionCommand`.
    RecordNameStrategy,
    /// `<topic>-<record full name>`.
    TopicRecordNameStrategy,
}

impl SubjectNameStrategy {
    /// The subject of a value of record `record_name` written to `topic`.
    pub fn subject(self, topic: &str, record_name: &str) -> String {
        match self {
            SubjectNameStrategy::TopicNameStrategy => format!("{topic}-value"),
            SubjectNameStrategy::RecordNameStrategy => record_name.to_owned(),
            SubjectNameStrategy::TopicRecordNameStrategy => format!("{topic}-{record_name}"),
        }
    }
}

impl std::str::FromStr for SubjectNameStrategy {
    type Err = ();

    /// Accepts the Confluent class names, with or without their package.
    fn from_str(s: &str) -> Result<Self, ()> {
        match s.rsplit('.').next().unwrap_or(s) {
            "TopicNameStrategy" => Ok(Self::TopicNameStrategy),
            "RecordNameStrategy" => Ok(Self::RecordNameStrategy),
            "TopicRecordNameStrategy" => Ok(Self::TopicRecordNameStrategy),
            _ => Err(()),
        }
    }
}

/// Where the registry is and how to talk to it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RegistrySettings {
    /// `SCHEMA_REGISTRY_URL`.
    pub url: String,
    /// `SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO` (`user:password`); shown masked.
    pub basic_auth_user_info: Option<String>,
    /// `SCHEMA_REGISTRY_SSL_CA_LOCATION`: PEM bundle of CAs to trust.
    pub ssl_ca_location: Option<PathBuf>,
    /// `SCHEMA_REGISTRY_SSL_CERTIFICATE_LOCATION`: PEM client certificate.
    pub ssl_certificate_location: Option<PathBuf>,
    /// `SCHEMA_REGISTRY_SSL_KEY_LOCATION`: PEM private key of the client certificate.
    pub ssl_key_location: Option<PathBuf>,
    /// `SCHEMA_REGISTRY_AUTO_REGISTER` (default true): register the output
    /// schemas; when false, look them up and fail if they are not there.
    pub auto_register: bool,
    /// `SCHEMA_REGISTRY_SUBJECT_NAME_STRATEGY` (default TopicNameStrategy).
    pub subject_name_strategy: SubjectNameStrategy,
    /// How long one request may take.
    #[serde(skip)]
    pub timeout: Duration,
}

impl RegistrySettings {
    /// Settings for `url` with Confluent's defaults.
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            basic_auth_user_info: None,
            ssl_ca_location: None,
            ssl_certificate_location: None,
            ssl_key_location: None,
            auto_register: true,
            subject_name_strategy: SubjectNameStrategy::default(),
            timeout: Duration::from_secs(10),
        }
    }
}

/// Why the client could not be built (bad configuration, named by setting).
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {reason}")]
pub struct RegistryConfigError {
    pub setting: &'static str,
    pub reason: String,
}

/// The client.
#[derive(Clone)]
pub struct RegistryClient {
    base_url: String,
    auth: Option<(String, Option<String>)>,
    http: reqwest::Client,
}

#[derive(serde::Deserialize)]
struct SchemaBody {
    schema: String,
}

#[derive(serde::Deserialize)]
struct IdBody {
    id: u32,
}

fn read_pem(setting: &'static str, path: &PathBuf) -> Result<Vec<u8>, RegistryConfigError> {
    std::fs::read(path).map_err(|e| RegistryConfigError {
        setting,
        reason: format!("cannot read {}: {e}", path.display()),
    })
}

impl RegistryClient {
    /// Builds the client; reads the TLS files now so a bad path fails at start.
    pub fn new(settings: &RegistrySettings) -> Result<Self, RegistryConfigError> {
        let mut builder = reqwest::Client::builder().timeout(settings.timeout);
        if let Some(path) = &settings.ssl_ca_location {
            let pem = read_pem("SCHEMA_REGISTRY_SSL_CA_LOCATION", path)?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| RegistryConfigError {
                    setting: "SCHEMA_REGISTRY_SSL_CA_LOCATION",
                    reason: e.to_string(),
                })?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        match (
            &settings.ssl_certificate_location,
            &settings.ssl_key_location,
        ) {
            (Some(cert), Some(key)) => {
                let mut pem = read_pem("SCHEMA_REGISTRY_SSL_KEY_LOCATION", key)?;
                pem.push(b'\n');
                pem.extend(read_pem("SCHEMA_REGISTRY_SSL_CERTIFICATE_LOCATION", cert)?);
                let identity =
                    reqwest::Identity::from_pem(&pem).map_err(|e| RegistryConfigError {
                        setting: "SCHEMA_REGISTRY_SSL_CERTIFICATE_LOCATION",
                        reason: e.to_string(),
                    })?;
                builder = builder.identity(identity);
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(RegistryConfigError {
                    setting: "SCHEMA_REGISTRY_SSL_KEY_LOCATION",
                    reason: "required with SCHEMA_REGISTRY_SSL_CERTIFICATE_LOCATION".into(),
                });
            }
            (None, Some(_)) => {
                return Err(RegistryConfigError {
                    setting: "SCHEMA_REGISTRY_SSL_CERTIFICATE_LOCATION",
                    reason: "required with SCHEMA_REGISTRY_SSL_KEY_LOCATION".into(),
                });
            }
        }
        let auth =
            settings
                .basic_auth_user_info
                .as_deref()
                .map(|info| match info.split_once(':') {
                    Some((user, password)) => (user.to_owned(), Some(password.to_owned())),
                    None => (info.to_owned(), None),
                });
        let http = builder.build().map_err(|e| RegistryConfigError {
            setting: "SCHEMA_REGISTRY_URL",
            reason: e.to_string(),
        })?;
        Ok(Self {
            base_url: settings.url.trim_end_matches('/').to_owned(),
            auth,
            http,
        })
    }

    /// The writer schema text registered under `id`.
    pub async fn schema_by_id(&self, id: u32) -> Result<String, CodecError> {
        let url = format!("{}/schemas/ids/{id}", self.base_url);
        let response = self.send(self.http.get(&url), &url).await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Err(CodecError::UnknownSchemaId(id));
        }
        let body: SchemaBody = Self::json(response, &url).await?;
        Ok(body.schema)
    }

    /// Registers `schema` under `subject` (or finds it there); returns its id.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, CodecError> {
        let url = format!("{}/subjects/{subject}/versions", self.base_url);
        let response = self
            .send(
                self.http
                    .post(&url)
                    .json(&serde_json::json!({ "schema": schema })),
                &url,
            )
            .await?;
        let body: IdBody = Self::json(response, &url).await?;
        Ok(body.id)
    }

    /// The id of `schema` under `subject`, which must already be registered.
    pub async fn lookup(&self, subject: &str, schema: &str) -> Result<u32, CodecError> {
        let url = format!("{}/subjects/{subject}", self.base_url);
        let response = self
            .send(
                self.http
                    .post(&url)
                    .json(&serde_json::json!({ "schema": schema })),
                &url,
            )
            .await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Err(CodecError::Registry(format!(
                "the schema is not registered under subject {subject} \
                 (register it, or set SCHEMA_REGISTRY_AUTO_REGISTER=true)"
            )));
        }
        let body: IdBody = Self::json(response, &url).await?;
        Ok(body.id)
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<reqwest::Response, CodecError> {
        let request = request.header(
            reqwest::header::ACCEPT,
            "application/vnd.schemaregistry.v1+json, application/json",
        );
        let request = match &self.auth {
            Some((user, password)) => request.basic_auth(user, password.as_ref()),
            None => request,
        };
        request
            .send()
            .await
            .map_err(|e| CodecError::RegistryUnavailable(format!("{url}: {e}")))
    }

    /// The JSON body of a successful answer. Any other answer but a 404 means
    /// the registry cannot serve us now (5xx, 429, 401/403 from credentials it
    /// refuses): nothing a message did, so it is an outage, retried.
    /// A 409 or 422 (a schema the registry refuses to register) is final.
    async fn json<T: serde::de::DeserializeOwned>(
        response: reqwest::Response,
        url: &str,
    ) -> Result<T, CodecError> {
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            let reason = format!(
                "{url}: HTTP {status} {}",
                body.chars().take(200).collect::<String>()
            );
            return Err(match status {
                StatusCode::CONFLICT | StatusCode::UNPROCESSABLE_ENTITY => {
                    CodecError::Registry(reason)
                }
                _ => CodecError::RegistryUnavailable(reason),
            });
        }
        response
            .json()
            .await
            .map_err(|e| CodecError::RegistryUnavailable(format!("{url}: unreadable answer: {e}")))
    }
}
