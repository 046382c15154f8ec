//! The engine's Avro schemas: embedded from `schemas/` at build time, each with
//! a local id, and optionally resolved through a Schema Registry over HTTP.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use apache_avro::Schema;

use super::CodecError;

/// The record types the engine reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchemaKind {
    FundingEvent,
    WithdrawalEvent,
    ConversionCommand,
    LedgerPosting,
    DeadLetter,
    BufferAlert,
}

impl SchemaKind {
    pub const ALL: [SchemaKind; 6] = [
        SchemaKind::FundingEvent,
        SchemaKind::WithdrawalEvent,
        SchemaKind::ConversionCommand,
        SchemaKind::LedgerPosting,
        SchemaKind::DeadLetter,
        SchemaKind::BufferAlert,
    ];

    /// The schema id used when no Schema Registry is configured.
    pub const fn local_id(self) -> u32 {
        match self {
            SchemaKind::FundingEvent => 1,
            SchemaKind::WithdrawalEvent => 2,
            SchemaKind::ConversionCommand => 3,
            SchemaKind::LedgerPosting => 4,
            SchemaKind::DeadLetter => 5,
            SchemaKind::BufferAlert => 6,
        }
    }

    /// The schema text, as committed in `schemas/`.
    pub const fn source(self) -> &'static str {
        match self {
            SchemaKind::FundingEvent => include_str!("../../schemas/funding_event.avsc"),
            SchemaKind::WithdrawalEvent => include_str!("../../schemas/withdrawal_event.avsc"),
            SchemaKind::ConversionCommand => {
                include_str!("../../schemas/conversion_command.avsc")
            }
            SchemaKind::LedgerPosting => include_str!("../../schemas/ledger_posting.avsc"),
            SchemaKind::DeadLetter => include_str!("../../schemas/dlq_record.avsc"),
            SchemaKind::BufferAlert => include_str!("../../schemas/buffer_alert.avsc"),
        }
    }

    /// The parsed schema. Schemas live for the whole process, so decoders can
    /// keep resolved forms of them without re-parsing per message.
    pub fn schema(self) -> &'static Schema {
        static PARSED: std::sync::OnceLock<HashMap<SchemaKind, &'static Schema>> =
            std::sync::OnceLock::new();
        PARSED.get_or_init(|| {
            SchemaKind::ALL
                .into_iter()
                .map(|kind| {
                    let schema = Schema::parse_str(kind.source())
                        .expect("schemas/ are checked by the codec tests");
                    (kind, &*Box::leak(Box::new(schema)))
                })
                .collect()
        })[&self]
    }
}

/// Where writer schemas come from: the embedded ones, plus (when configured)
/// a Schema Registry whose answers are cached for the life of the process.
#[derive(Clone)]
pub struct SchemaSource {
    registry: Option<RegistryClient>,
    by_id: Arc<RwLock<HashMap<u32, &'static Schema>>>,
}

impl SchemaSource {
    /// Only the embedded schemas, under their local ids.
    pub fn embedded() -> Self {
        let by_id = SchemaKind::ALL
            .into_iter()
            .map(|kind| (kind.local_id(), kind.schema()))
            .collect();
        Self {
            registry: None,
            by_id: Arc::new(RwLock::new(by_id)),
        }
    }

    /// Embedded schemas plus a Schema Registry at `url` for ids not known locally.
    pub fn with_registry(url: &str) -> Self {
        Self {
            registry: Some(RegistryClient::new(url)),
            ..Self::embedded()
        }
    }

    /// Registers an extra writer schema under `id` (schema evolution, tests).
    pub fn register(&self, id: u32, schema: Schema) {
        let leaked: &'static Schema = Box::leak(Box::new(schema));
        self.by_id
            .write()
            .expect("schema cache lock poisoned")
            .insert(id, leaked);
    }

    /// The cached writer schema for `id`, if known.
    pub fn cached(&self, id: u32) -> Option<&'static Schema> {
        self.by_id
            .read()
            .expect("schema cache lock poisoned")
            .get(&id)
            .copied()
    }

    /// The writer schema for `id`, asking the registry (once) if it is not cached.
    pub async fn writer_schema(&self, id: u32) -> Result<&'static Schema, CodecError> {
        if let Some(schema) = self.cached(id) {
            return Ok(schema);
        }
        let Some(registry) = &self.registry else {
            return Err(CodecError::UnknownSchemaId(id));
        };
        let schema = registry.fetch(id).await?;
        self.register(id, schema);
        self.cached(id).ok_or(CodecError::UnknownSchemaId(id))
    }
}

/// A minimal Confluent Schema Registry client (GET /schemas/ids/{id}).
#[derive(Clone)]
struct RegistryClient {
    base_url: String,
    http: reqwest::Client,
}

#[derive(serde::Deserialize)]
struct RegistrySchema {
    schema: String,
}

impl RegistryClient {
    fn new(url: &str) -> Self {
        Self {
            base_url: url.trim_end_matches('/').to_owned(),
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(10))
                .build()
                .expect("a client with only a timeout set builds"),
        }
    }

    async fn fetch(&self, id: u32) -> Result<Schema, CodecError> {
        let url = format!("{}/schemas/ids/{id}", self.base_url);
        let response = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| CodecError::Registry(format!("GET {url}: {e}")))?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Err(CodecError::UnknownSchemaId(id));
        }
        let body: RegistrySchema = response
            .error_for_status()
            .map_err(|e| CodecError::Registry(format!("GET {url}: {e}")))?
            .json()
            .await
            .map_err(|e| CodecError::Registry(format!("GET {url}: {e}")))?;
        Schema::parse_str(&body.schema)
            .map_err(|e| CodecError::Registry(format!("schema {id} does not parse: {e}")))
    }
}
