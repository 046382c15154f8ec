//! The engine's Avro schemas: embedded from `schemas/` at build time, each with
//! a local id, and the ids schemas go by: the local ids, or with a Schema
//! Registry configured, only the registry's (it is the authority: a local id
//! never shadows it).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use apache_avro::Schema;

use super::CodecError;
use super::registry::{RegistryClient, SubjectNameStrategy};

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

    /// The record's full name (`treasury.FundingEvent`), for subject names.
    pub fn full_name(self) -> String {
        match self.schema() {
            Schema::Record(record) => record.name.fullname(None),
            _ => format!("{self:?}"),
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

/// Where writer schemas come from and which id each output schema is written
/// with: the embedded schemas under their local ids, or (with a registry)
/// only what the registry says, cached for the life of the process.
#[derive(Clone)]
pub struct SchemaSource {
    registry: Option<Registry>,
    by_id: Arc<RwLock<HashMap<u32, &'static Schema>>>,
    output_ids: Arc<RwLock<HashMap<SchemaKind, u32>>>,
}

#[derive(Clone)]
struct Registry {
    client: RegistryClient,
    strategy: SubjectNameStrategy,
    auto_register: bool,
}

/// An output schema as the registry knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredOutput {
    pub kind: SchemaKind,
    pub subject: String,
    pub id: u32,
}

impl SchemaSource {
    /// Only the embedded schemas, under their local ids.
    pub fn embedded() -> Self {
        let by_id = SchemaKind::ALL
            .into_iter()
            .map(|kind| (kind.local_id(), kind.schema()))
            .collect();
        let output_ids = SchemaKind::ALL
            .into_iter()
            .map(|kind| (kind, kind.local_id()))
            .collect();
        Self {
            registry: None,
            by_id: Arc::new(RwLock::new(by_id)),
            output_ids: Arc::new(RwLock::new(output_ids)),
        }
    }

    /// A Schema Registry as the only authority on ids: every input id is
    /// asked there, and outputs are written only once
    /// [`SchemaSource::register_outputs`] has given them the registry's ids.
    pub fn with_registry(
        client: RegistryClient,
        strategy: SubjectNameStrategy,
        auto_register: bool,
    ) -> Self {
        Self {
            registry: Some(Registry {
                client,
                strategy,
                auto_register,
            }),
            by_id: Arc::default(),
            output_ids: Arc::default(),
        }
    }

    /// Whether a registry is the authority.
    pub fn has_registry(&self) -> bool {
        self.registry.is_some()
    }

    /// Registers an extra writer schema under `id` (schema evolution, tests).
    pub fn register(&self, id: u32, schema: Schema) {
        let leaked: &'static Schema = Box::leak(Box::new(schema));
        self.insert(id, leaked);
    }

    fn insert(&self, id: u32, schema: &'static Schema) {
        self.by_id
            .write()
            .expect("schema cache lock poisoned")
            .insert(id, schema);
    }

    /// The cached writer schema for `id`, if known.
    pub fn cached(&self, id: u32) -> Option<&'static Schema> {
        self.by_id
            .read()
            .expect("schema cache lock poisoned")
            .get(&id)
            .copied()
    }

    /// The writer schema for `id`, asking the registry (once) if it is not
    /// cached. [`CodecError::RegistryUnavailable`] when the registry cannot
    /// answer now.
    pub async fn writer_schema(&self, id: u32) -> Result<&'static Schema, CodecError> {
        if let Some(schema) = self.cached(id) {
            return Ok(schema);
        }
        let Some(registry) = &self.registry else {
            return Err(CodecError::UnknownSchemaId(id));
        };
        let text = registry.client.schema_by_id(id).await?;
        let schema = Schema::parse_str(&text).map_err(|e| CodecError::CorruptBody {
            id,
            reason: format!("the registry's schema {id} does not parse: {e}"),
        })?;
        // Our own schemas keep their static form, so reading them needs no
        // resolution.
        let known = SchemaKind::ALL
            .into_iter()
            .map(SchemaKind::schema)
            .find(|own| **own == schema);
        match known {
            Some(own) => self.insert(id, own),
            None => self.register(id, schema),
        }
        self.cached(id).ok_or(CodecError::UnknownSchemaId(id))
    }

    /// The id `kind` is written with.
    pub fn output_id(&self, kind: SchemaKind) -> Result<u32, CodecError> {
        self.output_ids
            .read()
            .expect("output id lock poisoned")
            .get(&kind)
            .copied()
            .ok_or_else(|| {
                CodecError::RegistryUnavailable(format!(
                    "no registry id for {kind:?} yet (output schemas not registered)"
                ))
            })
    }

    /// With a registry: registers (or, without auto-registration, looks up)
    /// each output schema under its subject for `topic` and writes it with
    /// the registry's id from then on. Without one: the local ids.
    pub async fn register_outputs(
        &self,
        outputs: &[(SchemaKind, &str)],
    ) -> Result<Vec<RegisteredOutput>, CodecError> {
        let Some(registry) = &self.registry else {
            return Ok(outputs
                .iter()
                .map(|(kind, topic)| RegisteredOutput {
                    kind: *kind,
                    subject: format!("{topic} (local schema, no registry)"),
                    id: kind.local_id(),
                })
                .collect());
        };
        let mut registered = Vec::new();
        for (kind, topic) in outputs {
            let subject = registry.strategy.subject(topic, &kind.full_name());
            let text = kind.source();
            let id = if registry.auto_register {
                registry.client.register(&subject, text).await?
            } else {
                registry.client.lookup(&subject, text).await?
            };
            self.insert(id, kind.schema());
            self.output_ids
                .write()
                .expect("output id lock poisoned")
                .insert(*kind, id);
            registered.push(RegisteredOutput {
                kind: *kind,
                subject,
                id,
            });
        }
        Ok(registered)
    }
}
