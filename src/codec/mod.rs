//! Avro in the Confluent wire format. Decoding never panics: an unknown schema
//! id, a wrong magic byte or a corrupt body is a [`CodecError`].
//!
//! Resolving a writer schema against a reader schema is costly, so each
//! (writer id, reader kind) pair is resolved once and the reader is cached.

pub mod alert;
mod flow_reader;
pub mod records;
pub mod registry;
pub mod schemas;
pub mod values;
pub mod wire;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;

pub use registry::{RegistryClient, RegistrySettings, SubjectNameStrategy};
pub use schemas::{RegisteredOutput, SchemaKind, SchemaSource};
pub use wire::FramingError;

/// Why bytes could not be decoded or a value encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error(transparent)]
    Framing(#[from] FramingError),
    #[error("unknown schema id {0}")]
    UnknownSchemaId(u32),
    #[error("corrupt Avro body for schema id {id}: {reason}")]
    CorruptBody { id: u32, reason: String },
    #[error("{trailing} bytes left over after the Avro body (schema id {id})")]
    TrailingBytes { id: u32, trailing: usize },
    #[error("writer schema {id} cannot be read as {reader:?}: {reason}")]
    Incompatible {
        id: u32,
        reader: SchemaKind,
        reason: String,
    },
    #[error("field {field}: {reason}")]
    Field { field: &'static str, reason: String },
    #[error("cannot encode {kind:?}: {reason}")]
    Encode { kind: SchemaKind, reason: String },
    #[error("schema registry: {0}")]
    Registry(String),
    /// The registry could not answer now (down, overloaded, refusing the
    /// credentials): nothing the message did; retry, never dead-letter.
    #[error("schema registry unavailable: {0}")]
    RegistryUnavailable(String),
}

impl CodecError {
    /// Whether the failure is something being down rather than the bytes
    /// being bad: the message must be retried, not refused.
    pub fn is_transient(&self) -> bool {
        matches!(self, CodecError::RegistryUnavailable(_))
    }
}

/// Resolved readers by (writer schema id, reader kind).
type ReaderCache = HashMap<(u32, SchemaKind), Arc<GenericDatumReader<'static>>>;

/// Encodes and decodes the engine's records in the Confluent wire format.
#[derive(Clone)]
pub struct Codec {
    source: SchemaSource,
    readers: Arc<RwLock<ReaderCache>>,
}

impl Default for Codec {
    fn default() -> Self {
        Self::new(SchemaSource::embedded())
    }
}

impl Codec {
    pub fn new(source: SchemaSource) -> Self {
        Self {
            source,
            readers: Arc::default(),
        }
    }

    /// The schemas this codec resolves ids against.
    pub fn source(&self) -> &SchemaSource {
        &self.source
    }

    /// Encodes `value` (which must match `kind`'s schema), framed with the id
    /// `kind` is written with (the registry's, when there is one).
    pub fn encode(&self, kind: SchemaKind, value: Value) -> Result<Vec<u8>, CodecError> {
        let id = self.source.output_id(kind)?;
        let body = writer_for(kind)?
            .write_value_to_vec(value)
            .map_err(|e| CodecError::Encode {
                kind,
                reason: e.to_string(),
            })?;
        Ok(wire::frame(id, &body))
    }

    /// Decodes a framed message, reading it as `reader` (schema resolution
    /// applies when the writer schema differs, e.g. a newer optional field).
    pub async fn decode(&self, bytes: &[u8], reader: SchemaKind) -> Result<Value, CodecError> {
        let (id, _) = wire::split(bytes)?;
        if self.source.cached(id).is_none() {
            self.source.writer_schema(id).await?;
        }
        self.decode_cached(bytes, reader)
    }

    /// A deposit or withdrawal read straight from its bytes, when it was
    /// written with exactly the `reader` flow schema (already known) and is
    /// plainly well-formed; `None` means "read it with
    /// [`Codec::decode_cached`]", which then also says what is wrong.
    pub fn read_flow_cached(
        &self,
        bytes: &[u8],
        reader: SchemaKind,
    ) -> Option<records::FlowRecord> {
        if !matches!(
            reader,
            SchemaKind::FundingEvent | SchemaKind::WithdrawalEvent
        ) {
            return None;
        }
        let (id, body) = wire::split(bytes).ok()?;
        if !std::ptr::eq(self.source.cached(id)?, reader.schema()) {
            return None;
        }
        flow_reader::read_flow(body)
    }

    /// Like [`Codec::decode`] but only with schemas already known; never does IO.
    /// The value has the reader schema's fields, in its order.
    pub fn decode_cached(&self, bytes: &[u8], reader: SchemaKind) -> Result<Value, CodecError> {
        let (id, mut body) = wire::split(bytes)?;
        let datum_reader = self.reader_for(id, reader)?;
        let project = !std::ptr::eq(
            self.source
                .cached(id)
                .ok_or(CodecError::UnknownSchemaId(id))?,
            reader.schema(),
        );
        let value = datum_reader
            .read_value(&mut body)
            .map_err(|e| CodecError::CorruptBody {
                id,
                reason: e.to_string(),
            })?;
        if !body.is_empty() {
            return Err(CodecError::TrailingBytes {
                id,
                trailing: body.len(),
            });
        }
        if project {
            project_record(value, reader.schema()).map_err(|reason| CodecError::Incompatible {
                id,
                reader,
                reason,
            })
        } else {
            Ok(value)
        }
    }

    fn reader_for(
        &self,
        id: u32,
        reader: SchemaKind,
    ) -> Result<Arc<GenericDatumReader<'static>>, CodecError> {
        if let Some(found) = self
            .readers
            .read()
            .expect("reader cache lock poisoned")
            .get(&(id, reader))
        {
            return Ok(found.clone());
        }
        let writer = self
            .source
            .cached(id)
            .ok_or(CodecError::UnknownSchemaId(id))?;
        let reader_schema = reader.schema();
        // Compatibility is checked once per writer schema; values are then read
        // with the writer schema alone. The record mappers read fields by
        // name, so a newer writer's extra fields are ignored. (apache-avro's
        // value resolution is not used: in 0.22 it refuses decimals written in
        // fewer bytes than the precision allows, which every producer does.)
        if !std::ptr::eq(writer, reader_schema) {
            SchemaCompatibility::can_read(writer, reader_schema).map_err(|e| {
                CodecError::Incompatible {
                    id,
                    reader,
                    reason: e.to_string(),
                }
            })?;
        }
        let built =
            GenericDatumReader::builder(writer)
                .build()
                .map_err(|e| CodecError::Incompatible {
                    id,
                    reader,
                    reason: e.to_string(),
                })?;
        let built = Arc::new(built);
        self.readers
            .write()
            .expect("reader cache lock poisoned")
            .insert((id, reader), built.clone());
        Ok(built)
    }
}

/// The writer for `kind`, resolved once for the life of the process.
fn writer_for(kind: SchemaKind) -> Result<&'static GenericDatumWriter<'static>, CodecError> {
    static WRITERS: std::sync::OnceLock<HashMap<SchemaKind, GenericDatumWriter<'static>>> =
        std::sync::OnceLock::new();
    WRITERS
        .get_or_init(|| {
            SchemaKind::ALL
                .into_iter()
                .filter_map(|k| {
                    GenericDatumWriter::builder(k.schema())
                        .build()
                        .ok()
                        .map(|w| (k, w))
                })
                .collect()
        })
        .get(&kind)
        .ok_or_else(|| CodecError::Encode {
            kind,
            reason: "schema does not resolve".into(),
        })
}

/// Keeps a written record's fields that the reader schema has, in the reader's
/// order; a field the writer lacks takes the reader's null default.
fn project_record(value: Value, reader: &apache_avro::Schema) -> Result<Value, String> {
    let (apache_avro::Schema::Record(schema), Value::Record(mut written)) = (reader, value) else {
        return Err("expected a record".into());
    };
    schema
        .fields
        .iter()
        .map(
            |field| match written.iter().position(|(name, _)| *name == field.name) {
                Some(i) => Ok(written.swap_remove(i)),
                None if field.default == Some(serde_json::Value::Null) => {
                    Ok((field.name.clone(), Value::Union(0, Box::new(Value::Null))))
                }
                None => Err(format!(
                    "the writer has no field {} and it has no default",
                    field.name
                )),
            },
        )
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Record)
}
